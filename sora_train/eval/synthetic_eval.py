"""Does a model trained on the synthetic corpus follow its prompts?

For held-out prompts ("a red square moving left on a black background") it generates clips
and measures colour accuracy (the moving object's dominant colour matches the prompt) and
motion accuracy (its centroid moves in the stated direction; chance is 1/4).

Run on its own: python -m sora_train.eval.synthetic_eval --model EXPORT_OR_CHECKPOINT --val SHARDS
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..data.shards import read_captions
from ..data.synthetic_captions import parse_caption
from ..generate import generate_videos
from ..models.denoiser import VideoDenoiser
from ..pretrained import InferenceConfig, load_model
from .synthetic_metrics import measure_clip


def held_out_prompts(val_source: str | None, limit: int) -> list[str]:
    """The first `limit` distinct captions of the validation shards."""
    if val_source is None:
        raise ValueError("the synthetic evaluation needs held-out prompts: set data.val")
    prompts: list[str] = []
    for _, caption in read_captions(val_source):
        if caption not in prompts:
            prompts.append(caption)
        if len(prompts) == limit:
            break
    return prompts


def evaluate_prompts(
    model: VideoDenoiser, config: InferenceConfig, prompts: list[str], batch_size: int, seed: int = 0
) -> tuple[int, int, int]:
    """Generate one clip per prompt; returns (colour correct, motion correct, clips)."""
    color_correct = motion_correct = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        clips = generate_videos(
            model, config.model, chunk, config.clip_shape, config.diffusion, seed=seed + start
        )
        for clip, prompt in zip(clips, chunk, strict=True):
            color, _, direction = parse_caption(prompt)
            measured_color, measured_direction = measure_clip(clip)
            color_correct += measured_color == color
            motion_correct += measured_direction == direction
    return color_correct, motion_correct, len(prompts)


def main(argv: list[str] | None = None) -> int:
    """CLI: print the two accuracies as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an export (sora-export) or a checkpoint directory")
    parser.add_argument("--val", required=True, help="validation shards of the synthetic corpus")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        model, config = load_model(args.model)
        prompts = held_out_prompts(args.val, args.num_prompts)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with torch.inference_mode():
        color, motion, clips = evaluate_prompts(model, config, prompts, args.batch_size, args.seed)
    print(json.dumps({"color_acc": color / clips, "motion_acc": motion / clips, "num_clips": clips}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
