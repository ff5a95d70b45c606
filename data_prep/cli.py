"""`sora-prep`: build training corpora.

Subcommands import their modules when they run: `shards` workers are spawned processes that
re-import this module, and should not pay for what they do not use.

Each subcommand is a `_add_<name>` function that registers its arguments and sets `handler`, a
function taking the parsed arguments and returning an exit code. Usage and input errors print one
line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import NoReturn


class _UsageError(Exception):
    """A bad command line or argument value; reported as one line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {message}")


def _run_synthetic(args: argparse.Namespace) -> int:
    """Generate the synthetic moving-shapes corpus and print a one-line summary."""
    from sora_train.data.synthetic import MANIFEST_NAME, generate_corpus

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
        "--num-val",
        type=int,
        default=72,
        help="held-out val clips, cycling through the 18 combinations kept out of training (default 72)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--samples-per-shard", type=int, default=128, help="clips per tar (default 128)")
    parser.add_argument("--fps", type=int, default=8, help="frame rate (default 8)")
    parser.add_argument("--min-frames", type=int, default=16, help="shortest clip (default 16)")
    parser.add_argument("--max-frames", type=int, default=20, help="longest clip (default 20)")
    parser.add_argument("--workers", type=int, default=None, help="processes writing shards (default: cores)")
    parser.set_defaults(handler=_run_synthetic)


def _run_shards(args: argparse.Namespace) -> int:
    """Probe, filter and shard a video folder or list; print a summary."""
    from sora_train.data_prep.build_shards import ShardOptions, build_shards, parse_shard_size
    from sora_train.data_prep.probe import PrepOptions

    start = time.perf_counter()
    shard_samples, shard_bytes = parse_shard_size(args.shard_size)
    prep = PrepOptions(
        min_seconds=args.min_seconds,
        max_seconds=args.max_seconds,
        min_side=args.min_side,
        max_aspect=args.max_aspect,
        clip_seconds=args.clip_seconds,
        max_side=args.max_side,
        crf=args.crf,
    )
    options = ShardOptions(
        src=Path(args.src),
        out=Path(args.out),
        prep=prep,
        shard_samples=shard_samples,
        shard_bytes=shard_bytes,
        val_fraction=args.val_fraction,
        workers=args.workers or os.cpu_count() or 1,
        timeout=args.timeout,
        buckets=args.buckets or None,
        node_rank=args.node_rank,
        num_nodes=args.num_nodes,
    )
    manifest = build_shards(options)
    splits = ", ".join(
        f"{split} {entry['num_samples']} samples in {len(entry['shards'])} shards"
        for split, entry in manifest["splits"].items()
    )
    rejects = ", ".join(f"{reason} {count}" for reason, count in manifest["rejects"].items()) or "none"
    seconds = time.perf_counter() - start
    print(f"sora-prep shards: {splits}; rejected: {rejects} -> {options.out} in {seconds:.1f}s")
    return 0


def _add_shards(subparsers: argparse._SubParsersAction) -> None:
    """Register `sora-prep shards`."""
    parser = subparsers.add_parser("shards", help="turn captioned videos into webdataset shards")
    parser.add_argument(
        "--src",
        required=True,
        help="a folder of videos with .txt/.json caption sidecars, or a .csv/.jsonl list",
    )
    parser.add_argument(
        "--out", required=True, help="output directory (train/, val/, manifest.json, rejects.jsonl)"
    )
    parser.add_argument("--shard-size", default="1000", help="samples per shard (1000) or bytes (512MB, 2GB)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="shortest clip kept (default 1.0)")
    parser.add_argument(
        "--max-seconds", type=float, default=None, help="longest video kept (default: no limit)"
    )
    parser.add_argument(
        "--min-side", type=int, default=64, help="smallest shorter side in pixels (default 64)"
    )
    parser.add_argument(
        "--max-aspect", type=float, default=3.0, help="largest long:short side ratio (default 3)"
    )
    parser.add_argument(
        "--clip-seconds", type=float, default=None, help="split videos into clips of this length (re-encoded)"
    )
    parser.add_argument(
        "--max-side", type=int, default=None, help="re-encode videos whose longer side exceeds this"
    )
    parser.add_argument("--crf", type=int, default=18, help="H.264 quality of re-encodes (default 18)")
    parser.add_argument(
        "--val-fraction", type=float, default=0.01, help="share of sources for val (default 0.01)"
    )
    parser.add_argument("--workers", type=int, default=None, help="probe processes (default: cores)")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds per input before it is rejected"
    )
    parser.add_argument(
        "--buckets",
        default="video_256",
        help="bucket table counted in the manifest (name or .yaml; '' for none)",
    )
    parser.add_argument("--node-rank", type=int, default=0, help="this node's share of the input (default 0)")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes splitting the input (default 1)")
    parser.set_defaults(handler=_run_shards)


def _run_encode(args: argparse.Namespace) -> int:
    """Encode video shards into latent shards (this rank's share under torchrun)."""
    from sora_train.data_prep.encode import EncodeOptions, encode_shards

    start = time.perf_counter()
    options = EncodeOptions(
        src=args.src,
        out=Path(args.out),
        buckets=args.buckets,
        latent_space=args.latent_space,
        vae_path=args.vae,
        text_encoder=args.text_encoder,
        text_encoder_path=args.text_encoder_path,
        text_max_length=args.text_max_length,
        device=args.device,
        dtype=args.dtype,
        storage_dtype=args.storage_dtype,
        decoder=args.decoder,
    )
    manifest = encode_shards(options)
    if manifest is not None:
        skipped = ", ".join(f"{reason} {count}" for reason, count in manifest["skipped"].items()) or "none"
        seconds = time.perf_counter() - start
        print(
            f"sora-prep encode: {manifest['num_samples']} samples in {len(manifest['shards'])} shards; "
            f"skipped: {skipped} -> {options.out} in {seconds:.1f}s"
        )
    return 0


def _add_encode(subparsers: argparse._SubParsersAction) -> None:
    """Register `sora-prep encode`."""
    parser = subparsers.add_parser("encode", help="precompute VAE latents (and text embeddings) per bucket")
    parser.add_argument(
        "--src", required=True, help="video shards: a directory of .tar, one .tar, or a brace pattern"
    )
    parser.add_argument("--out", required=True, help="output directory for the latent shards")
    parser.add_argument(
        "--buckets", default="video_256", help="bucket table (name or .yaml; default video_256)"
    )
    parser.add_argument("--latent-space", default="pixel", choices=["pixel", "wan"], help="default pixel")
    parser.add_argument("--vae", default=None, help="local directory of the VAE (for --latent-space wan)")
    parser.add_argument(
        "--text-encoder", default="none", choices=["none", "t5", "umt5"], help="none keeps captions as text"
    )
    parser.add_argument("--text-encoder-path", default=None, help="local directory of the T5/UMT5 encoder")
    parser.add_argument("--text-max-length", type=int, default=128, help="caption tokens (default 128)")
    parser.add_argument(
        "--device", default="cuda" if _has_cuda() else "cpu", help="default: cuda when present"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="encoder compute dtype"
    )
    parser.add_argument(
        "--storage-dtype",
        default="float16",
        choices=["float16", "float32"],
        help="stored arrays (default float16)",
    )
    parser.add_argument(
        "--decoder",
        default="auto",
        help="video decoder, as the trainer's data.decoder: auto (decord, else torchcodec, else PyAV), "
        "decord, torchcodec or pyav",
    )
    parser.set_defaults(handler=_run_encode)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_inspect(args: argparse.Namespace) -> int:
    """Print what a shard directory holds."""
    from sora_train.data_prep.inspect_dir import inspect_directory

    print(inspect_directory(args.directory, args.buckets or None))
    return 0


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    """Register `sora-prep inspect`."""
    parser = subparsers.add_parser("inspect", help="counts, hours, buckets and rejects of a shard directory")
    parser.add_argument(
        "directory", help="a directory written by `sora-prep shards` or `encode`, or any shards"
    )
    parser.add_argument("--buckets", default="video_256", help="table for shards without a manifest")
    parser.set_defaults(handler=_run_inspect)


def _run_index(args: argparse.Namespace) -> int:
    """Write the compact sample index beside every shard of a source; print a summary."""
    from sora_train.data_prep.side_index import index_shards

    start = time.perf_counter()
    counts = index_shards(args.source, args.force, args.workers or os.cpu_count() or 1)
    seconds = time.perf_counter() - start
    print(
        f"sora-prep index: {counts['written']} shards indexed, {counts['current']} already were; "
        f"{counts['samples']} usable samples in {seconds:.1f}s"
    )
    return 0


def _add_index(subparsers: argparse._SubParsersAction) -> None:
    """Register `sora-prep index`."""
    parser = subparsers.add_parser("index", help="write the compact sample index beside existing shards")
    parser.add_argument("source", help="a directory of .tar shards, one .tar, or a brace pattern")
    parser.add_argument("--force", action="store_true", help="rewrite indexes that are already current")
    parser.add_argument(
        "--workers", type=int, default=None, help="processes scanning shards (default: cores)"
    )
    parser.set_defaults(handler=_run_index)


def build_parser() -> argparse.ArgumentParser:
    """The `sora-prep` parser with every subcommand registered."""
    parser = _Parser(prog="sora-prep", description="Build training corpora for sora-train.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_synthetic(subparsers)
    _add_shards(subparsers)
    _add_encode(subparsers)
    _add_inspect(subparsers)
    _add_index(subparsers)
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
