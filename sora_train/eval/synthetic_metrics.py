"""Score generated clips on the synthetic task: is the object the captioned colour, moving the right way?

`measure_clip` reads colour and motion straight off the pixels, robustly enough for noisy, blurry,
low-resolution samples; `score_clips` compares those readings with what the captions ask for.
"""

from __future__ import annotations

import numpy as np

from ..data.synthetic_captions import COLORS, parse_caption

_MIN_BRIGHTNESS = 80.0  # object pixels have a channel above this (and above half the clip's peak)
_MIN_AREA = 0.002  # fraction of a frame's pixels the object must cover to count as present
_MIN_DISPLACEMENT = 0.05  # fraction of min(H, W) the object must move to have a direction
_END_FRAMES = 4  # frames averaged at each end of the clip for the displacement
_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float32) / 255.0


def _brightest_channel(pixels: np.ndarray) -> np.ndarray:
    """Per-pixel maximum over the trailing RGB axis (much faster than .max(axis=-1) on uint8)."""
    return np.maximum(np.maximum(pixels[..., 0], pixels[..., 1]), pixels[..., 2])


def _object_weights(frames: np.ndarray) -> np.ndarray:
    """(F, H, W) brightness above threshold of object pixels, zero for background pixels."""
    brightness = _brightest_channel(frames).astype(np.float32)
    threshold = max(_MIN_BRIGHTNESS, 0.5 * float(np.percentile(brightness, 99.9)))
    return np.where(brightness > threshold, brightness - threshold, 0.0)


def _dominant_color(frames: np.ndarray, weights: np.ndarray) -> str:
    """Majority vote over object pixels of the nearest palette colour, brightness normalised away."""
    pixels = frames[weights > 0].astype(np.float32)
    chroma = pixels / np.maximum(_brightest_channel(pixels), 1.0)[:, None]
    # argmin over the palette of |chroma - p|^2, dropping the |chroma|^2 term common to every p
    distances = (_PALETTE**2).sum(axis=-1) - 2.0 * chroma @ _PALETTE.T
    votes = np.bincount(distances.argmin(axis=1), minlength=len(_PALETTE_NAMES))
    return _PALETTE_NAMES[int(votes.argmax())]


def _centroid(weights: np.ndarray) -> np.ndarray:
    """Brightness-weighted (y, x) centroid of one frame's object pixels."""
    ys, xs = np.indices(weights.shape, dtype=np.float32)
    total = weights.sum()
    return np.array([(weights * ys).sum() / total, (weights * xs).sum() / total])


def _direction(weights: np.ndarray) -> str | None:
    """Direction of the centroid's displacement between the first and last frames, or None."""
    num_frames, height, width = weights.shape
    ends = max(1, min(_END_FRAMES, num_frames // 4))
    end_frames = np.concatenate([weights[:ends], weights[-ends:]])
    present = (end_frames > 0).mean(axis=(1, 2)) >= _MIN_AREA
    if num_frames < 2 or not present.all():
        return None
    centroids = np.stack([_centroid(frame) for frame in end_frames])
    dy, dx = centroids[ends:].mean(axis=0) - centroids[:ends].mean(axis=0)
    if max(abs(dy), abs(dx)) < _MIN_DISPLACEMENT * min(height, width):
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def measure_clip(frames: np.ndarray) -> tuple[str | None, str | None]:
    """Read (colour, motion direction) off a (F, H, W, 3) uint8 clip on a dark background.

    Object pixels are those whose brightest channel is well above the background. The colour is
    the palette entry most object pixels are nearest to (None if there is no object); the direction
    comes from the brightness-weighted centroid averaged over a few frames at each end (None if the
    object is missing from those frames or moves less than 5% of min(H, W)). Image y grows
    downward, so "up" means the centroid's y decreases.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames shaped (F, H, W, 3), got {frames.shape}")
    weights = _object_weights(frames)
    if (weights > 0).mean() < _MIN_AREA:
        return None, None
    return _dominant_color(frames, weights), _direction(weights)


def score_clips(clips: list[np.ndarray], captions: list[str]) -> dict:
    """Fraction of clips whose measured colour / direction match their caption's.

    Returns {"color_acc", "motion_acc", "num_clips"}; a clip with no reading counts as wrong.
    """
    if len(clips) != len(captions):
        raise ValueError(f"got {len(clips)} clips but {len(captions)} captions")
    if not clips:
        raise ValueError("no clips to score")
    color_hits = motion_hits = 0
    for clip, caption in zip(clips, captions, strict=True):
        want_color, _, want_direction = parse_caption(caption)
        color, direction = measure_clip(clip)
        color_hits += color == want_color
        motion_hits += direction == want_direction
    return {
        "color_acc": color_hits / len(clips),
        "motion_acc": motion_hits / len(clips),
        "num_clips": len(clips),
    }
