"""sora-sample: write mp4 clips for prompts from an export, a checkpoint, or a run dir."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .export import resolve_checkpoint
from .generate import generate_videos, save_clips
from .models.patch import grid_size
from .pretrained import CONFIG_FILE, load_model


def model_directory(path: str | Path) -> Path:
    """An export directory as is; a run dir resolves to its newest checkpoint."""
    path = Path(path)
    return path if (path / CONFIG_FILE).is_file() else resolve_checkpoint(path)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sora-sample`."""
    parser = argparse.ArgumentParser(prog="sora-sample", description=__doc__)
    parser.add_argument("--model", required=True, help="export directory, checkpoint directory, or run dir")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several clips")
    parser.add_argument("--out", required=True, help="directory for the mp4 files")
    parser.add_argument("--frames", type=int, help="default: the training clip length")
    parser.add_argument("--height", type=int, help="default: the training height")
    parser.add_argument("--width", type=int, help="default: the training width")
    parser.add_argument("--steps", type=int, help="Euler steps (default: the model's config)")
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale")
    parser.add_argument("--fps", type=float, help="frame rate of the written files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        model, config = load_model(model_directory(args.model))
        shape = (args.frames or config.num_frames, args.height or config.height, args.width or config.width)
        grid_size(shape, tuple(config.model.patch_size))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.steps:
        config.diffusion.sample_steps = args.steps
    if args.cfg_scale is not None:
        config.diffusion.cfg_scale = args.cfg_scale
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clips = generate_videos(
        model.to(device), config.model, args.prompt, shape, config.diffusion, seed=args.seed
    )
    for path in save_clips(clips, args.prompt, Path(args.out), args.fps or config.fps):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
