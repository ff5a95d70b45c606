"""sora-sample: write mp4 clips for prompts from an export, a checkpoint, or a run dir.

A model trained with frame conditioning also takes given frames: `--image` (image-to-video),
`--video` (extend a video from its last frames), `--last-image` (end on an image; with `--image`,
interpolate between the two). They are centre-cropped and resized to the sampling size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from .data.decode import clip_stride, fit_frames
from .export import resolve_checkpoint
from .generate import generate_videos, save_clips
from .models.patch import grid_size
from .pretrained import CONFIG_FILE, InferenceConfig, load_model
from .video_io import read_video


def model_directory(path: str | Path) -> Path:
    """An export directory as is; a run dir resolves to its newest checkpoint."""
    path = Path(path)
    return path if (path / CONFIG_FILE).is_file() else resolve_checkpoint(path)


def read_image(path: str, height: int, width: int) -> np.ndarray:
    """An image file as one (1, height, width, 3) uint8 frame (centre crop, resize)."""
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            frame = np.asarray(image.convert("RGB"))[None]  # (1, H0, W0, 3)
    except OSError as error:
        raise ValueError(f"{path}: not a readable image ({error})") from error
    return rearrange(fit_frames(frame, height, width), "c f h w -> f h w c").numpy()


def read_context(path: str, count: int, fps: float, height: int, width: int) -> np.ndarray:
    """The last `count` frames of a video file at the model's frame rate `fps` (every
    round(source fps / fps)-th frame, ending on the last one): (count, height, width, 3) uint8,
    or fewer when the video is shorter."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    try:
        video, source_fps = read_video(path)  # (F0, H0, W0, 3)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable video ({error})") from error
    frames = video[::-1][:: clip_stride(source_fps, fps, 1)][:count][::-1]
    return rearrange(fit_frames(frames, height, width), "c f h w -> f h w c").numpy()


def given_frames(
    args: argparse.Namespace, config: InferenceConfig, shape: tuple[int, int, int]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The frames the clips start with (`--image` or `--video`) and end with (`--last-image`)."""
    if not (args.image or args.video or args.last_image):
        return None, None
    if not config.model.frame_conditioning:
        raise ValueError(
            "--image, --video and --last-image need a model trained with model.frame_conditioning=true"
        )
    frames, height, width = shape
    first = last = None
    if args.image:
        first = read_image(args.image, height, width)
    elif args.video:
        count = args.context_frames or max(1, frames // 2)
        first = read_context(args.video, count, config.fps, height, width)
    if args.last_image:
        last = read_image(args.last_image, height, width)
    return first, last


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


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
    given = parser.add_argument_group("given frames (models trained with model.frame_conditioning=true)")
    start = given.add_mutually_exclusive_group()
    start.add_argument("--image", help="image-to-video: every clip starts with this image")
    start.add_argument("--video", help="extension: every clip starts with this video's last frames")
    given.add_argument(
        "--context-frames",
        type=positive,
        help="frames taken from the end of --video (default: half the clip)",
    )
    given.add_argument("--last-image", help="every clip ends on this image (with --image: interpolation)")
    args = parser.parse_args(argv)
    if args.context_frames and not args.video:
        parser.error("--context-frames needs --video")
    try:
        model, config = load_model(model_directory(args.model))
        shape = (args.frames or config.num_frames, args.height or config.height, args.width or config.width)
        grid_size(shape, tuple(config.model.patch_size))
        first, last = given_frames(args, config, shape)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.steps:
        config.diffusion.sample_steps = args.steps
    if args.cfg_scale is not None:
        config.diffusion.cfg_scale = args.cfg_scale
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        clips = generate_videos(
            model.to(device), config.model, args.prompt, shape, config.diffusion, args.seed, first, last
        )
    except ValueError as error:  # given frames that cover no or every latent frame
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in save_clips(clips, args.prompt, Path(args.out), args.fps or config.fps):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
