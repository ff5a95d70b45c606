"""`sora-prep`: build training corpora.

Each subcommand is a `_add_<name>` function that registers its arguments and sets `handler`, a
function taking the parsed arguments and returning an exit code. Usage and input errors print one
line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn

from sora_train.data_prep.synthetic import MANIFEST_NAME, generate_corpus


class _UsageError(Exception):
    """A bad command line or argument value; reported as one line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {message}")


def _run_synthetic(args: argparse.Namespace) -> int:
    """Generate the synthetic moving-shapes corpus and print a one-line summary."""
    start = time.perf_counter()
    manifest = generate_corpus(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        fps=args.fps,
        min_frames=args.min_frames,
        max_frames=args.max_frames,
        workers=args.workers,
    )
    counts = ", ".join(
        f"{split} {entry['num_samples']} clips in {len(entry['shards'])} shards"
        for split, entry in manifest["splits"].items()
    )
    seconds = time.perf_counter() - start
    print(f"sora-prep synthetic: {counts} -> {Path(args.out) / MANIFEST_NAME} in {seconds:.1f}s")
    return 0


def _add_synthetic(subparsers: argparse._SubParsersAction) -> None:
    """Register `sora-prep synthetic`."""
    parser = subparsers.add_parser("synthetic", help="write the embedded moving-shapes corpus")
    parser.add_argument("--out", required=True, help="output directory (train/, val/, manifest.json)")
    parser.add_argument("--num-train", type=int, default=2048, help="train clips (default 2048)")
    parser.add_argument(
        "--num-val", type=int, default=72, help="held-out val clips (default 72: every combination once)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--samples-per-shard", type=int, default=128, help="clips per tar (default 128)")
    parser.add_argument("--fps", type=int, default=8, help="frame rate (default 8)")
    parser.add_argument("--min-frames", type=int, default=16, help="shortest clip (default 16)")
    parser.add_argument("--max-frames", type=int, default=20, help="longest clip (default 20)")
    parser.add_argument("--workers", type=int, default=None, help="processes writing shards (default: cores)")
    parser.set_defaults(handler=_run_synthetic)


def build_parser() -> argparse.ArgumentParser:
    """The `sora-prep` parser with every subcommand registered."""
    parser = _Parser(prog="sora-prep", description="Build training corpora for sora-train.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synthetic(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `sora-prep`; returns the exit code (2 for bad arguments or a failed write)."""
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except _UsageError as error:
        print(error, file=sys.stderr)
    except (ValueError, OSError) as error:
        print(f"sora-prep: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
