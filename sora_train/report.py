"""RUN_DIR/report.html: one self-contained page about a run, to open in any browser.

It shows the training and validation loss and the throughput over the steps (metrics.jsonl), each
clip of the synthetic evaluation (eval_synthetic/) enlarged as a strip of frames with its prompt
and the colour and motion measured on it, and the samples written during training
(samples/step_XXXXXXX/*.mp4) as strips with their step and prompt. Everything, images included,
is inside the file (data URIs): no network, no scripts. The figures come from `sora_train.plots`.

Written by rank 0 at the end of a run (`report_run`, which never fails the run), or for an
existing run dir:

    python -m sora_train.report RUN_DIR [--out PATH]
"""

from __future__ import annotations

import argparse
import base64
import sys
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np

from .eval.synthetic_eval import RESULTS_DIR, ClipResult, load_clip_results
from .metrics import read_metrics
from .plots import loss_png, strip_png, throughput_png
from .run_info import read_run_info

REPORT_FILE = "report.html"
MAX_SAMPLE_STEPS = 12  # sample steps shown at most, evenly spaced (first and last included)
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table.summary td { padding: 0.15em 1em 0.15em 0; }
figure { margin: 0.8em 0; } figure img { image-rendering: pixelated; display: block; max-width: 100%; }
figcaption { font-size: 0.9em; margin-top: 0.3em; }
.ok { color: #11772c; } .bad { color: #b3261e; } .muted { color: #777; }
"""


@dataclass
class Sample:
    """One sample clip written during training."""

    step: int
    prompt: str
    path: Path


def data_uri_img(png: bytes, alt: str, title: str | None = None) -> str:
    """An <img> holding `png` as a base64 data URI."""
    encoded = base64.b64encode(png).decode("ascii")
    title_attr = f' title="{escape(title)}"' if title else ""
    return f'<img src="data:image/png;base64,{encoded}" alt="{escape(alt)}"{title_attr}>'


def validation_rows(rows: list[dict]) -> list[dict]:
    """The `validation` events of metrics rows that carry a loss."""
    return [row for row in rows if row.get("event") == "validation" and row.get("val_loss") is not None]


def summary_section(run_dir: Path, info: dict, rows: list[dict]) -> str:
    """The run's name, commit (from its run info), steps, final losses and evaluation scores, as a
    small table."""
    steps = [row for row in rows if "loss" in row]
    validations = validation_rows(rows)
    scores = [row for row in rows if row.get("event") == "eval_synthetic"]
    items = [("run dir", str(run_dir)), ("git SHA", info.get("git_sha", "unknown"))]
    if steps:
        items += [("steps", str(steps[-1]["step"])), ("final training loss", f"{steps[-1]['loss']:.4f}")]
    if validations:
        items.append(("final validation loss", f"{validations[-1]['val_loss']:.4f}"))
    if scores:
        last = scores[-1]
        items.append(("prompt following", f"colour accuracy {last['color_acc']:.2f}, motion accuracy "
                                          f"{last['motion_acc']:.2f} on {last['num_clips']} clips"))  # fmt: skip
    cells = "".join(f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in items)
    return f'<table class="summary">{cells}</table>'


def curves_section(rows: list[dict]) -> str:
    """The loss (training and validation) and throughput plots, or a note when no step was logged."""
    steps = [row for row in rows if "loss" in row and "samples_per_s" in row]
    if not steps:
        return "<h2>Training</h2><p class='muted'>No training steps in metrics.jsonl.</p>"
    validations = validation_rows(rows)
    loss = loss_png(
        [row["step"] for row in steps], [row["loss"] for row in steps],
        [row["step"] for row in validations], [row["val_loss"] for row in validations],
    )  # fmt: skip
    throughput = throughput_png([row["step"] for row in steps], [row["samples_per_s"] for row in steps])
    return (
        "<h2>Training</h2>"
        f"<figure>{data_uri_img(loss, 'Loss: training and validation loss over steps', 'Loss')}</figure>"
        f"<figure>{data_uri_img(throughput, 'Throughput: clips/s over steps', 'Throughput')}</figure>"
    )


def verdict(measured: str | None, expected: str, ok: bool) -> str:
    """'red ✓' or 'blue ✗ (asked red)', marked up as right or wrong; 'none' when nothing was measured."""
    reading = escape(measured or "none")
    if ok:
        return f'<span class="ok">{reading} ✓</span>'
    return f'<span class="bad">{reading} ✗ (asked {escape(expected)})</span>'


def clip_figure(number: int, result: ClipResult) -> str:
    """Evaluated clip `number`: its enlarged strip, prompt, and measured colour and motion."""
    image = data_uri_img(strip_png(result.clip), f"generated clip {number}: {result.prompt}")
    return (
        f'<figure class="eval-clip">{image}<figcaption>“{escape(result.prompt)}” — '
        f"colour: {verdict(result.color, result.expected_color, result.color_ok)}; "
        f"motion: {verdict(result.motion, result.expected_motion, result.motion_ok)}</figcaption></figure>"
    )


def evaluation_section(results: list[ClipResult]) -> str:
    """Every clip of the synthetic evaluation, with the accuracies over them; empty without any."""
    if not results:
        return ""
    colour, motion = sum(r.color_ok for r in results), sum(r.motion_ok for r in results)
    clips, prompts = len(results), len({r.prompt for r in results})
    return (
        "<h2>Prompt following (eval.synthetic)</h2>"
        f"<p>{clips} clips for {prompts} held-out prompts: colour right for {colour}/{clips}, "
        f"motion right for {motion}/{clips}.</p>"
        + "".join(clip_figure(n, r) for n, r in enumerate(results, 1))
    )


def find_samples(run_dir: Path, prompts: list[str]) -> list[Sample]:
    """The sample mp4s of the run, by step then prompt index; `prompts`: the run's sample prompts
    (a file whose index has none is named by its file name)."""
    samples = []
    for step_dir in sorted((run_dir / "samples").glob("step_*")):
        if not step_dir.name.removeprefix("step_").isdigit():
            continue
        for path in sorted(step_dir.glob("*.mp4")):
            index, _, slug = path.stem.partition("_")
            known = index.isdigit() and int(index) < len(prompts)
            prompt = prompts[int(index)] if known else slug.replace("-", " ")
            samples.append(Sample(int(step_dir.name.removeprefix("step_")), prompt, path))
    return samples


def sample_figure(sample: Sample) -> str:
    """One training sample: a strip of its decoded frames with its step and prompt."""
    from .video_io import read_video

    caption = f"step {sample.step}: “{escape(sample.prompt)}”"
    try:
        frames, _ = read_video(sample.path)
    except ValueError as error:
        return f'<figure class="sample"><figcaption>{caption} — not decodable ({escape(str(error))})</figcaption></figure>'
    image = data_uri_img(strip_png(frames), f"sample at step {sample.step}: {sample.prompt}")
    return f'<figure class="sample">{image}<figcaption>{caption}</figcaption></figure>'


def samples_section(run_dir: Path, prompts: list[str]) -> str:
    """The samples of up to MAX_SAMPLE_STEPS steps (evenly spaced); empty when there are none."""
    samples = find_samples(run_dir, prompts)
    steps = sorted({sample.step for sample in samples})
    if not steps:
        return ""
    picks = np.linspace(0, len(steps) - 1, min(len(steps), MAX_SAMPLE_STEPS)).round().astype(int)
    shown = {steps[i] for i in picks}
    note = "" if len(shown) == len(steps) else f" ({len(shown)} of {len(steps)} sample steps shown)"
    figures = "".join(sample_figure(s) for s in samples if s.step in shown)
    return f"<h2>Samples during training{note}</h2>{figures}"


def build_report(run_dir: str | Path) -> str:
    """The HTML of `run_dir`'s report."""
    run_dir = Path(run_dir).resolve()
    rows, info = read_metrics(run_dir), read_run_info(run_dir)
    sample_prompts = info.get("config", {}).get("train", {}).get("sample_prompts", [])
    body = (
        f"<h1>Run {escape(run_dir.name)}</h1>"
        + summary_section(run_dir, info, rows)
        + curves_section(rows)
        + evaluation_section(load_clip_results(run_dir / RESULTS_DIR))
        + samples_section(run_dir, sample_prompts)
    )
    title = f"sora_train report: {escape(run_dir.name)}"
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
    )


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write `run_dir`'s report to `out` (default RUN_DIR/report.html) atomically; returns its path."""
    path = Path(out) if out is not None else Path(run_dir) / REPORT_FILE
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(build_report(run_dir), encoding="utf-8")
    staged.replace(path)
    return path


def report_run(run_dir: str | Path) -> Path | None:
    """End of a run (rank 0): write the report and print where it is. Never raises: a failure is
    printed as a warning and gives None, so the report cannot change the run's outcome."""
    try:
        path = write_report(run_dir)
    except Exception as error:  # any failure: the report must not fail the run
        print(
            f"warning: report.html not written: {type(error).__name__}: {error}", file=sys.stderr, flush=True
        )
        return None
    print(f"report: {path}", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    """CLI: write the report of an existing run dir."""
    parser = argparse.ArgumentParser(prog="python -m sora_train.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run dir (holding metrics.jsonl)")
    parser.add_argument("--out", type=Path, help=f"where the page goes (default: RUN_DIR/{REPORT_FILE})")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"error: {args.run_dir} is not a directory", file=sys.stderr)
        return 2
    print(f"report: {write_report(args.run_dir, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
