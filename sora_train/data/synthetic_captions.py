"""The caption grammar of the synthetic corpus: "a red square moving left on a black background".

The one place that names the colours, shapes and directions of the embedded moving-shapes corpus,
and which of their combinations are held out of training. The generator (`sora_train.data.synthetic`)
writes captions with `caption_for`; the prompt-following evaluation (`sora_train.eval`) reads them
back with `parse_caption`.
"""

from __future__ import annotations

import itertools
import re

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
COMBINATIONS: tuple[tuple[str, str, str], ...] = tuple(itertools.product(COLORS, SHAPES, DIRECTIONS))


def _held_out(color: str, shape: str, direction: str) -> bool:
    """Colour i and shape j are held out moving in direction (i + j) mod 4: one direction per
    (colour, shape) pair, a different one for each of a colour's shapes, so every colour and every
    shape is still trained moving every way and only the triple is new."""
    turn = (list(COLORS).index(color) + SHAPES.index(shape)) % len(DIRECTIONS)
    return DIRECTIONS[turn] == direction


# The captions of the held-out split: 18 combinations that no training clip shows.
HELD_OUT_COMBINATIONS = tuple(c for c in COMBINATIONS if _held_out(*c))
TRAINING_COMBINATIONS = tuple(c for c in COMBINATIONS if not _held_out(*c))

_CAPTION_RE = re.compile(r"a (\w+) (\w+) moving (\w+) on a black background")


def caption_for(color: str, shape: str, direction: str) -> str:
    """The caption of a clip: "a {color} {shape} moving {direction} on a black background"."""
    return f"a {color} {shape} moving {direction} on a black background"


def parse_caption(caption: str) -> tuple[str, str, str]:
    """Invert `caption_for`: (color, shape, direction). Raises ValueError for anything else."""
    match = _CAPTION_RE.fullmatch(caption.strip().lower().rstrip("."))
    if match is None:
        raise ValueError(
            f"not a synthetic caption (want {caption_for('COLOR', 'SHAPE', 'DIR')!r}): {caption!r}"
        )
    color, shape, direction = match.groups()
    for word, allowed in ((color, tuple(COLORS)), (shape, SHAPES), (direction, DIRECTIONS)):
        if word not in allowed:
            raise ValueError(f"unknown word {word!r} in caption {caption!r}; expected one of {allowed}")
    return color, shape, direction
