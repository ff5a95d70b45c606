"""The embedded default dataset: short clips of one coloured shape moving on a black background.

Every clip shows a filled square, circle or triangle in one of six saturated colours, moving at
constant speed left, right, up or down, captioned "a red square moving left on a black background"
(the grammar lives in `synthetic_captions`, shared with the evaluation). The whole trajectory stays
inside the central min(H, W) square, so the object and its motion remain visible after the trainer
resizes the short side and centre-crops. The held-out split shows only the 18 combinations that no
training clip shows, so its captions are prompts the model never saw.

`generate_corpus` writes webdataset tar shards (`KEY.mp4` + `KEY.json` per sample) for a train and a
held-out val split plus `manifest.json`; the same arguments always produce byte-identical files.
The trainer writes it on first use (`data.generate_if_missing`); `sora-prep synthetic` calls the same
function.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ..video_io import encode_mp4
from .shard_writer import remove_shard, write_shard
from .synthetic_captions import (
    COLORS,
    DIRECTIONS,
    HELD_OUT_COMBINATIONS,
    SHAPES,
    TRAINING_COMBINATIONS,
    caption_for,
)

# (height, width), all sides even; decord cannot decode widths 16, 24, 48 or 72, so none are used.
FRAME_SIZES: tuple[tuple[int, int], ...] = (
    (64, 64),  # 1:1
    (48, 64),  # 4:3
    (54, 96),  # 16:9
    (48, 80),  # 5:3
    (64, 96),  # 3:2
    (80, 60),  # 3:4 portrait
    (96, 54),  # 9:16 portrait
    (80, 40),  # 1:2 portrait
)
MANIFEST_NAME = "manifest.json"
# 2: the held-out split shows only combinations that no training clip shows (1: every combination
# captioned clips of both splits). `ensure_corpus` rewrites a corpus of an older version.
CORPUS_VERSION = 2
_SPLIT_STREAMS = {"train": 0, "val": 1}
_UNIT_STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)
_OBJECT_SIZE = (0.35, 0.45)  # fraction of min(H, W)
_TRAVEL = (0.40, 0.55)  # fraction of min(H, W)
_JITTER = 0.08  # perpendicular start jitter, fraction of min(H, W)


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of a shape of half-size `radius`, given pixel offsets from its centre."""
    if shape == "square":
        return (np.abs(dy) <= radius) & (np.abs(dx) <= radius)
    if shape == "circle":
        return dy**2 + dx**2 <= radius**2
    if shape == "triangle":  # apex up, base of width 2*radius at the bottom
        return (np.abs(dy) <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _trajectory(
    direction: str, side: int, num_frames: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame (cy, cx) of the object centre in central-square coordinates; the path is centred.

    Half the longest travel plus the largest half-size is 0.5 * side, and the jitter is smaller than
    the slack perpendicular to the motion, so the object never leaves the central square.
    """
    step_y, step_x = _UNIT_STEP[direction]
    travel = rng.uniform(*_TRAVEL) * side
    jitter = rng.uniform(-_JITTER, _JITTER) * side
    progress = np.linspace(-0.5, 0.5, num_frames, dtype=np.float32) * np.float32(travel)
    middle = side / 2
    cy = middle + step_y * progress + (jitter if step_y == 0 else 0.0)
    cx = middle + step_x * progress + (jitter if step_x == 0 else 0.0)
    return cy, cx


def render_clip(
    color: str,
    shape: str,
    direction: str,
    height: int,
    width: int,
    num_frames: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Render a (num_frames, height, width, 3) uint8 clip of one filled shape moving on black.

    The object is 35-45% of min(height, width) across and travels 40-55% of it at constant speed,
    its path centred in (and kept inside) the central min(height, width) square.
    """
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; expected one of {tuple(COLORS)}")
    if direction not in _UNIT_STEP:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
    side = min(height, width)
    radius = rng.uniform(*_OBJECT_SIZE) * side / 2
    cy, cx = _trajectory(direction, side, num_frames, rng)
    top, left = (height - side) / 2, (width - side) / 2
    ys = np.arange(height, dtype=np.float32)[None, :, None] + 0.5 - top
    xs = np.arange(width, dtype=np.float32)[None, None, :] + 0.5 - left
    mask = _shape_mask(shape, ys - cy[:, None, None], xs - cx[:, None, None], radius)
    palette = np.array([(0, 0, 0), COLORS[color]], dtype=np.uint8)
    return np.take(palette, mask.astype(np.uint8), axis=0)


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent random stream per (seed, split, sample), so splits never share draws."""
    return np.random.default_rng([seed, _SPLIT_STREAMS[split], index])


def _make_sample(
    split: str, index: int, seed: int, fps: int, frame_range: tuple[int, int]
) -> dict[str, str | bytes]:
    """One webdataset sample: the clip as mp4 bytes plus its JSON metadata."""
    rng = _sample_rng(seed, split, index)
    if split == "val":
        color, shape, direction = HELD_OUT_COMBINATIONS[index % len(HELD_OUT_COMBINATIONS)]
    else:
        color, shape, direction = TRAINING_COMBINATIONS[rng.integers(len(TRAINING_COMBINATIONS))]
    height, width = FRAME_SIZES[rng.integers(len(FRAME_SIZES))]
    num_frames = int(rng.integers(frame_range[0], frame_range[1] + 1))
    frames = render_clip(color, shape, direction, height, width, num_frames, rng)
    meta = {
        "caption": caption_for(color, shape, direction),
        "color": color,
        "shape": shape,
        "direction": direction,
        "fps": fps,
        "num_frames": num_frames,
        "height": height,
        "width": width,
    }
    return {
        "__key__": f"{split}{index:07d}",
        "mp4": encode_mp4(frames, fps=fps),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def _write_numbered_shard(path: Path, split: str, indices: range, sample_args: dict) -> None:
    """Render, encode and write the samples `indices` of `split` as one shard (runs in a worker process)."""
    write_shard(path, [_make_sample(split, index, **sample_args) for index in indices])


def _write_split(
    out: Path, split: str, num_samples: int, samples_per_shard: int, pool: Executor, sample_args: dict
) -> dict[str, object]:
    """Write all shards of one split (in parallel on `pool`); returns the split's manifest entry."""
    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    shards, sizes, jobs = [], [], []
    for shard_index, start in enumerate(range(0, num_samples, samples_per_shard)):
        indices = range(start, min(start + samples_per_shard, num_samples))
        path = split_dir / f"shard-{shard_index:06d}.tar"
        jobs.append(pool.submit(_write_numbered_shard, path, split, indices, sample_args))
        shards.append(path.relative_to(out).as_posix())
        sizes.append(len(indices))
    for job in jobs:
        job.result()  # re-raises a worker's error
    for stale in sorted(split_dir.glob("shard-*.tar")):
        if stale.relative_to(out).as_posix() not in shards:
            remove_shard(stale)
    return {"shards": shards, "num_samples": num_samples, "shard_sizes": sizes}


def _check_args(
    num_train: int, num_val: int, samples_per_shard: int, fps: int, min_frames: int, max_frames: int
) -> None:
    """Raise ValueError for arguments that cannot make a corpus."""
    if num_train < 1 or num_val < 0:
        raise ValueError(f"need num_train >= 1 and num_val >= 0, got {num_train} and {num_val}")
    if samples_per_shard < 1 or fps < 1:
        raise ValueError(f"need samples_per_shard >= 1 and fps >= 1, got {samples_per_shard} and {fps}")
    if not 2 <= min_frames <= max_frames:
        raise ValueError(f"need 2 <= min_frames <= max_frames, got {min_frames} and {max_frames}")


def generate_corpus(
    out: str | Path,
    num_train: int = 2048,
    num_val: int = 72,
    seed: int = 0,
    samples_per_shard: int = 128,
    fps: int = 8,
    min_frames: int = 16,
    max_frames: int = 20,
    workers: int | None = None,
) -> dict:
    """Write train/val webdataset shards and `manifest.json` under `out`; returns the manifest.

    Train samples draw one of the 54 training combinations of (color, shape, direction), a frame
    size and a length uniformly at random; val samples cycle through the 18 held-out combinations
    (so num_val = 72 shows each four times) from a separate random stream. Shards are written
    atomically and are byte-identical for identical arguments. The manifest is written last and
    lists the shards, so shard_urls only ever sees complete ones.
    Shards are written by `workers` processes (default: one per core).
    """
    _check_args(num_train, num_val, samples_per_shard, fps, min_frames, max_frames)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sample_args = {"seed": seed, "fps": fps, "frame_range": (min_frames, max_frames)}
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        splits = {
            split: _write_split(out, split, count, samples_per_shard, pool, sample_args)
            for split, count in (("train", num_train), ("val", num_val))
        }
    manifest = {
        "name": "synthetic",
        "version": CORPUS_VERSION,
        "seed": seed,
        "fps": fps,
        "min_frames": min_frames,
        "max_frames": max_frames,
        "splits": splits,
        "frame_sizes": [list(size) for size in FRAME_SIZES],
        "colors": list(COLORS),
        "shapes": list(SHAPES),
        "directions": list(DIRECTIONS),
        "caption_template": caption_for("{color}", "{shape}", "{direction}"),
        "held_out_captions": [caption_for(*combination) for combination in HELD_OUT_COMBINATIONS],
    }
    partial = out / (MANIFEST_NAME + ".partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, out / MANIFEST_NAME)
    return manifest


CORPUS_WRITE_SECONDS = 600.0  # `ensure_corpus` writes 2,120 short clips: 7.4 s on 2 CPU cores


def _outdated_corpus(root: Path) -> int | None:
    """The version of the synthetic corpus at `root` when it is older than `CORPUS_VERSION`."""
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("name") != "synthetic":
        return None
    version = manifest.get("version", 1)
    return version if isinstance(version, int) and version < CORPUS_VERSION else None


def ensure_corpus(train_split: str | Path) -> bool:
    """Write the corpus (default arguments) into the parent of `train_split` when that split is
    missing or half-written, or when it holds a synthetic corpus of an older version; returns
    whether it wrote. A current corpus and any other existing directory without an interrupted
    write are left alone, even if empty (the loader then refuses it), so a user's own path is never
    written into."""
    train_dir = Path(train_split)
    root = train_dir.parent
    old_version = _outdated_corpus(root)
    if old_version is not None:
        print(
            f"rewriting the synthetic corpus at {root}: it is version {old_version}, this is {CORPUS_VERSION}",
            flush=True,
        )
    elif (root / MANIFEST_NAME).exists() or (train_dir.exists() and not any(train_dir.glob("*.partial"))):
        return False
    else:
        print(f"writing the synthetic corpus to {root}", flush=True)
    generate_corpus(root)
    return True


def shard_urls(root: str | Path, split: str) -> list[str]:
    """Sorted paths of the tar shards of `split`, read from `root`/manifest.json."""
    root = Path(root)
    manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in {root / MANIFEST_NAME}; have {sorted(manifest['splits'])}")
    return sorted(str(root / shard) for shard in manifest["splits"][split]["shards"])
