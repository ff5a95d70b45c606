"""Does a model trained on the synthetic corpus follow its prompts?

For held-out prompts ("a red square moving left on a black background") it generates clips
and measures colour accuracy (the moving object's dominant colour matches the prompt) and
motion accuracy (its centroid moves in the stated direction; chance is 1/4). Each clip's result
(`ClipResult`: the clip, what was asked, what was measured) can be kept in a run dir
(`save_clip_results`, under `eval_synthetic/`) for the run's report (`sora_train/report.py`).

Run on its own: python -m sora_train.eval.synthetic_eval --model EXPORT_OR_CHECKPOINT --val SHARDS
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.shards import read_captions
from ..data.synthetic_captions import parse_caption
from ..generate import generate_videos
from ..models.denoiser import VideoDenoiser
from ..pretrained import InferenceConfig, load_model
from .synthetic_metrics import measure_clip


def held_out_prompts(val_source: str | None, limit: int) -> list[str]:
    """The captions of the first `limit` held-out clips, in shard order: one generated clip per
    held-out clip, so a caption shared by several held-out clips is asked for that many times (with
    other noise). In the synthetic corpus these are combinations no training clip shows."""
    if val_source is None:
        raise ValueError("the synthetic evaluation needs held-out prompts: set data.val")
    prompts: list[str] = []
    for _, caption in read_captions(val_source):
        if len(prompts) == limit:
            break
        prompts.append(caption)
    return prompts


@dataclass
class ClipResult:
    """One evaluated prompt: its generated clip, the colour and motion it asks for, and what
    `measure_clip` read off the clip (None: no reading)."""

    prompt: str
    clip: np.ndarray  # (F, H, W, 3) uint8
    expected_color: str
    expected_motion: str
    color: str | None
    motion: str | None

    @property
    def color_ok(self) -> bool:
        """Whether the measured colour is the one asked for."""
        return self.color == self.expected_color

    @property
    def motion_ok(self) -> bool:
        """Whether the measured direction is the one asked for."""
        return self.motion == self.expected_motion


def evaluate_clips(
    model: VideoDenoiser, config: InferenceConfig, prompts: list[str], batch_size: int, seeds: Sequence[int]
) -> list[ClipResult]:
    """Generate one clip per prompt, `batch_size` at a time, prompt i's noise seeded by `seeds[i]`
    (so a clip does not depend on the batch or the rank it is generated in), and measure each clip."""
    results = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        clips = generate_videos(
            model,
            config.model,
            chunk,
            config.clip_shape,
            config.diffusion,
            seed=seeds[start : start + batch_size],
        )
        for clip, prompt in zip(clips, chunk, strict=True):
            color, _, direction = parse_caption(prompt)
            results.append(ClipResult(prompt, clip, color, direction, *measure_clip(clip)))
    return results


def count_correct(results: list[ClipResult]) -> tuple[int, int, int]:
    """(colour correct, motion correct, clips) over `results`."""
    return sum(r.color_ok for r in results), sum(r.motion_ok for r in results), len(results)


RESULTS_DIR = "eval_synthetic"  # in a run dir
CLIPS_FILE, RESULTS_FILE = "clips.npz", "results.json"  # in RESULTS_DIR
_RECORD_FIELDS = ("prompt", "expected_color", "expected_motion", "color", "motion")


def save_clip_results(results: list[ClipResult], directory: str | Path) -> Path:
    """Write `results` to `directory`: clips.npz (`clips`, (N, F, H, W, 3) uint8) and results.json
    (per clip, in the same order: prompt, expected and measured colour and motion, whether each
    matches). Returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clips = np.stack([r.clip for r in results]) if results else np.zeros((0, 0, 0, 0, 3), np.uint8)
    np.savez_compressed(directory / CLIPS_FILE, clips=clips)
    records = [
        {**{k: getattr(r, k) for k in _RECORD_FIELDS}, "color_ok": r.color_ok, "motion_ok": r.motion_ok}
        for r in results
    ]
    (directory / RESULTS_FILE).write_text(json.dumps(records, indent=1) + "\n")
    return directory


def load_clip_results(directory: str | Path) -> list[ClipResult]:
    """The results `save_clip_results` wrote to `directory` (an empty list when there are none)."""
    directory = Path(directory)
    if not (directory / RESULTS_FILE).exists():
        return []
    records = json.loads((directory / RESULTS_FILE).read_text())
    with np.load(directory / CLIPS_FILE) as data:
        clips = data["clips"]
    return [
        ClipResult(clip=clip, **{k: record[k] for k in _RECORD_FIELDS})
        for clip, record in zip(clips, records, strict=True)
    ]


def main(argv: list[str] | None = None) -> int:
    """CLI: print the two accuracies as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an export (sora-export) or a checkpoint directory")
    parser.add_argument("--val", required=True, help="validation shards of the synthetic corpus")
    parser.add_argument(
        "--num-prompts",
        type=int,
        default=72,
        help="how many held-out clips' captions to generate (default 72)",
    )
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
        seeds = range(args.seed, args.seed + len(prompts))
        color, motion, clips = count_correct(evaluate_clips(model, config, prompts, args.batch_size, seeds))
    print(json.dumps({"color_acc": color / clips, "motion_acc": motion / clips, "num_clips": clips}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
