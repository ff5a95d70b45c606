"""Every figure the reports draw, as PNG bytes: curves for a run's report.html (`sora_train.report`)
and the sweep figure of `sora-sweep` (`sora_train.sweep`), drawn with matplotlib's object API (no
pyplot, no global backend); and clips laid out as enlarged strips of frames (numpy + Pillow).

Each PNG carries its title and this module's name in its metadata (`Title`, `Software`), so a
figure says what drew it.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from einops import rearrange, repeat

SOFTWARE = "sora_train.plots"
DPI = 110
STRIP_HEIGHT = 96  # pixels per frame in a strip (16×16 frames are enlarged 6×)
STRIP_FRAMES = 8  # at most this many frames per strip, evenly spaced
GAP_VALUE = 96  # grey between the frames of a strip


@dataclass
class Curve:
    """One line of a plot: y over x, drawn faint (`faint`) or with markers (`marker`)."""

    label: str
    x: list[float]
    y: list[float]
    marker: str | None = None
    faint: bool = False


def png_bytes(figure, title: str, dpi: int = DPI) -> bytes:
    """The matplotlib `figure` as PNG bytes, with `title` and this module in its metadata."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Title": title, "Software": SOFTWARE})
    return buffer.getvalue()


def new_axes(size: tuple[float, float] = (7, 3.6)):
    """A fresh figure (not registered with pyplot) and its single axes."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=size)
    return figure, figure.subplots()


def curves_png(curves: list[Curve], title: str, xlabel: str, ylabel: str) -> bytes:
    """Lines over a shared integer x axis (steps), with a legend when there are several."""
    from matplotlib.ticker import MaxNLocator

    figure, axes = new_axes()
    for curve in curves:
        style = {"alpha": 0.35, "linewidth": 0.8} if curve.faint else {"linewidth": 1.6}
        axes.plot(curve.x, curve.y, label=curve.label, marker=curve.marker, **style)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    axes.grid(alpha=0.3)
    if len(curves) > 1:
        axes.legend()
    return png_bytes(figure, title)


def rolling_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the `window - 1` before it (fewer at the start)."""
    sums = np.cumsum([0.0, *values])
    return [(sums[i + 1] - sums[max(0, i + 1 - window)]) / min(i + 1, window) for i in range(len(values))]


def smoothing_window(count: int) -> int:
    """A window of about 2% of `count` points (1: no smoothing for short runs)."""
    return max(1, count // 50)


def loss_png(steps: list[int], losses: list[float], val_steps: list[int], val_losses: list[float]) -> bytes:
    """Training loss per step (with its rolling mean when there are many steps) and validation loss."""
    window = smoothing_window(len(steps))
    curves = [Curve("training loss", steps, losses, faint=window > 1)]
    if window > 1:
        curves.append(Curve(f"training loss (mean of {window} steps)", steps, rolling_mean(losses, window)))
    if val_losses:
        curves.append(Curve("validation loss", val_steps, val_losses, marker="o"))
    return curves_png(curves, "Loss", "step", "flow-matching loss")


def throughput_png(steps: list[int], clips_per_s: list[float]) -> bytes:
    """Clips per second at each step (with its rolling mean when there are many steps)."""
    window = smoothing_window(len(steps))
    curves = [Curve("clips/s", steps, clips_per_s, faint=window > 1)]
    if window > 1:
        curves.append(Curve(f"clips/s (mean of {window} steps)", steps, rolling_mean(clips_per_s, window)))
    return curves_png(curves, "Throughput", "step", "clips/s")


def sweep_png(summaries: list[dict], keys: list[str]) -> bytes:
    """Final validation loss against the one numeric swept setting (log axis when it spans 10×),
    or one bar per run labelled with its settings (`sora_train.sweep.summarize` rows)."""
    figure, axes = new_axes((7, 4))
    values = [_number(s["settings"].get(keys[0])) for s in summaries] if len(keys) == 1 else []
    if values and all(value is not None for value in values):
        order = sorted(range(len(values)), key=values.__getitem__)
        axes.plot([values[i] for i in order], [summaries[i]["val_loss"] for i in order], marker="o")
        if min(values) > 0 and max(values) >= 10 * min(values):
            axes.set_xscale("log")
        axes.set_xlabel(keys[0])
    else:
        labels = [", ".join(f"{k}={s['settings'].get(k)}" for k in keys) or s["run"] for s in summaries]
        axes.bar(range(len(summaries)), [s["val_loss"] for s in summaries])
        axes.set_xticks(range(len(summaries)), labels, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("final validation loss")
    title = f"{len(summaries)} runs"
    axes.set_title(title)
    return png_bytes(figure, title, dpi=120)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def frame_strip(frames: np.ndarray, scale: int, gap: int = 2) -> np.ndarray:
    """(H·scale, F·W·scale + (F-1)·gap, 3) uint8: the (F, H, W, 3) uint8 `frames` side by side, each
    enlarged `scale` times by nearest neighbour, with `gap` grey columns between them."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0 or scale < 1:
        raise ValueError(f"expected frames shaped (F, H, W, 3) and scale >= 1, got {frames.shape}, {scale}")
    big = repeat(frames, "f h w c -> f (h sh) (w sw) c", sh=scale, sw=scale)  # (F, H·s, W·s, 3)
    padded = np.pad(big, ((0, 0), (0, 0), (0, gap), (0, 0)), constant_values=GAP_VALUE)  # (F, H·s, W·s+g, 3)
    strip = rearrange(padded, "f h w c -> h (f w) c")  # (H·s, F·(W·s+g), 3)
    return np.ascontiguousarray(strip[:, : strip.shape[1] - gap])


def pick_frames(frames: np.ndarray, count: int = STRIP_FRAMES) -> np.ndarray:
    """At most `count` of the (F, H, W, 3) frames, evenly spaced, first and last included."""
    if len(frames) <= count:
        return frames
    return frames[np.linspace(0, len(frames) - 1, count).round().astype(int)]


def strip_png(frames: np.ndarray, height: int = STRIP_HEIGHT, count: int = STRIP_FRAMES) -> bytes:
    """A PNG strip of up to `count` frames of a (F, H, W, 3) uint8 clip, each about `height` pixels
    high: small frames are enlarged by a whole factor, large ones thinned by a whole stride."""
    from PIL import Image

    frames = pick_frames(frames, count)
    stride = math.ceil(frames.shape[1] / height)
    frames = frames[:, ::stride, ::stride]  # nearest neighbour when frames are larger than `height`
    buffer = io.BytesIO()
    Image.fromarray(frame_strip(frames, max(1, height // frames.shape[1]))).save(buffer, format="PNG")
    return buffer.getvalue()
