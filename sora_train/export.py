"""sora-export: a checkpoint's weights as safetensors + config.json, loadable by sora-sample.

`--weights ema` (default) takes the EMA weights the checkpoint holds; `--weights raw`
consolidates the DeepSpeed ZeRO shards (any stage) into full fp32 weights. The checkpoint's
manifest is verified first, and DeepSpeed's files are read with weights-only loads, so a file
this trainer did not write is never unpickled.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .checkpoint import CheckpointInvalid
from .checkpoint.resuming import newest_valid_checkpoint
from .checkpoint.safe_load import UnsafeCheckpoint, weights_only_loads
from .pretrained import CONFIG_FILE, EMA_WEIGHTS, EXPORT_WEIGHTS, load_model, save_weights


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory that verifies against its manifest, or a run dir's newest such one.

    Raises FileNotFoundError when there is none (naming what was wrong with each candidate).
    """
    try:
        selection = newest_valid_checkpoint(Path(path))
    except CheckpointInvalid as error:
        raise FileNotFoundError(str(error)) from error
    if selection.directory is None:
        raise FileNotFoundError(f"{path} is not a checkpoint nor a run dir with one")
    return selection.directory


def consolidated_weights(checkpoint: Path) -> dict:
    """Full fp32 weights gathered from the ZeRO shards of a checkpoint (weights-only loads)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name))


def export(checkpoint: str | Path, out: str | Path, weights: str = "ema") -> Path:
    """Write out/model.safetensors and out/config.json from a checkpoint; returns `out`."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"--weights must be ema or raw, got {weights!r}")
    source = resolve_checkpoint(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if weights == "ema":
        shutil.copyfile(source / EMA_WEIGHTS, out / EXPORT_WEIGHTS)
    else:
        save_weights(out / EXPORT_WEIGHTS, consolidated_weights(source))
    shutil.copyfile(source / CONFIG_FILE, out / CONFIG_FILE)
    load_model(out)  # proves the export loads: names and shapes match the config
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sora-export`."""
    parser = argparse.ArgumentParser(prog="sora-export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint", help="a checkpoint directory, or a run dir (its newest valid checkpoint)"
    )
    parser.add_argument("--out", required=True, help="directory for model.safetensors and config.json")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.weights)
    except (FileNotFoundError, ValueError, CheckpointInvalid, UnsafeCheckpoint) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.weights} weights to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
