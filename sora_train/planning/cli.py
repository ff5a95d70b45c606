"""sora-plan: will a run fit its GPUs? Memory and FLOPs per GPU, per bucket, before launching it.

`sora-plan [overrides] [--gpus N] [--gpu TYPE] [--json]` composes the same config as
`sora-train` and prints the model's parameters and how many train (LoRA: the adapters, with
`model.lora.rank > 0`); per GPU: parameter, gradient, optimizer and EMA bytes under the ZeRO
stage and offload settings; and per bucket: video tokens, the loader's batch size, tokens per
GPU under sequence parallelism, activation bytes under the activation checkpointing policy
(`train.activation_checkpointing`), FLOPs per step, and whether it fits; when a bucket does not,
the sequence-parallel degree and the checkpointing policies at which every bucket would. Exit
status: 0 when every bucket fits, 1 when one does not, 2 on a bad configuration.
"""

from __future__ import annotations

import argparse
import sys

from ..compose import compose_config
from ..config import ConfigError
from ..hardware import gpu_names
from .plan import fitting_policies, format_plan, plan_json, plan_run, required_sequence_parallel


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sora-plan`; returns (and exits with) 0 when everything fits, 1 when not, 2 on errors."""
    parser = argparse.ArgumentParser(
        prog="sora-plan",
        description="Memory and FLOPs per GPU of a sora-train run, per bucket. Exit 1 when a bucket does not fit.",
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, as for sora-train (model=B parallel=zero3 ...)"
    )
    parser.add_argument(
        "--gpus", type=int, default=None, help="number of GPUs (default: launch.nproc_per_node)"
    )
    parser.add_argument("--gpu", default="H100", help=f"GPU type: {', '.join(gpu_names())} (default H100)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = compose_config(args.overrides)
        gpus = args.gpus if args.gpus is not None else cfg.launch.nproc_per_node
        plan = plan_run(cfg, gpus, args.gpu)
        suggestion = None if plan.fits else required_sequence_parallel(cfg, gpus, args.gpu)
        policies = () if plan.fits else fitting_policies(cfg, gpus, args.gpu)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return _exit(2, argv)
    print(plan_json(plan, suggestion, policies) if args.json else format_plan(plan, suggestion, policies))
    return _exit(0 if plan.fits else 1, argv)


def _exit(code: int, argv: list[str] | None) -> int:
    """Exit with `code` when run as a command (argv None); return it when called from Python."""
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
