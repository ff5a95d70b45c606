"""report.html after a real run, the strips and figures it is made of, and the live progress line."""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sora_train import plots
from sora_train.eval.synthetic_eval import RESULTS_DIR, evaluate_clips, held_out_prompts, load_clip_results
from sora_train.eval.synthetic_metrics import measure_clip
from sora_train.export import resolve_checkpoint
from sora_train.loop.reporting import LiveProgress
from sora_train.metrics import read_metrics
from sora_train.pretrained import load_model
from sora_train.report import REPORT_FILE, report_run
from sora_train.sweep import main as sweep_main

from .conftest import FAST, REPO

PROMPT = "a red square moving left on a black background"
EVAL_PROMPTS = 5  # over 2 ranks: 3 and 2, two batches on rank 0


def run_in_terminal(args: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run `python -m sora_train.cli args` with a 120-column pseudo-terminal as stdin and stdout
    (stderr apart); its exit code and what the terminal received."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "sora_train.cli", *args], cwd=REPO, stdin=follower, stdout=follower,
        stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    os.close(follower)
    received, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: every process that held it has exited
                break
            if not chunk:
                break
            received.append(chunk)
        code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        process.kill()
        os.close(leader)
    return code, b"".join(received).decode(errors="replace")


@pytest.fixture(scope="module")
def terminal_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """2 steps on 2 processes in a terminal: validation and a sample prompt at both steps, then
    eval.synthetic on 5 held-out prompts. The run dir and the terminal's output."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    code, output = run_in_terminal([
        *FAST, f"data.train={corpus / 'train'}", f"data.val={corpus / 'val'}", "data.num_workers=0",
        "launch.nproc_per_node=2", "train.global_batch_size=4", "train.max_steps=2", "checkpoint.every=0",
        "eval.val_every=1", "eval.val_batches=1", "train.sample_every=1", f"train.sample_prompts=[{PROMPT}]",
        "eval.synthetic=true", f"eval.num_prompts={EVAL_PROMPTS}", "eval.batch_size=2", f"run_dir={run_dir}",
    ])  # fmt: skip
    assert code == 0, output[-4000:]
    return run_dir, output


def embedded_images(page: str) -> dict[str, Image.Image]:
    """Every <img> of the page by its alt text, decoded from its data URI."""
    found = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]*)"', page)
    return {alt: Image.open(io.BytesIO(base64.b64decode(data))) for data, alt in found}


@pytest.mark.distributed
def test_the_run_ends_pointing_at_a_self_contained_report(terminal_run):
    run_dir, output = terminal_run
    page = (run_dir / REPORT_FILE).read_text()
    last_line = output.replace("\r", "\n").strip().splitlines()[-1]
    assert last_line == f"report: {run_dir / REPORT_FILE}"
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "<link" not in page and "url(" not in page and "@import" not in page
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)


@pytest.mark.distributed
def test_the_report_plots_the_loss_and_the_throughput(terminal_run):
    run_dir, _ = terminal_run
    images = embedded_images((run_dir / REPORT_FILE).read_text())
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if r.get("event") == "validation"] == [1, 2]  # two points to plot
    loss = images["Loss: training and validation loss over steps"]
    throughput = images["Throughput: clips/s over steps"]
    for image, title in ((loss, "Loss"), (throughput, "Throughput")):
        assert image.text["Title"] == title and image.text["Software"] == plots.SOFTWARE
        assert image.size[0] > 400


@pytest.mark.distributed
def test_the_report_shows_every_evaluated_clip_enlarged_with_what_was_measured(terminal_run, corpus):
    run_dir, _ = terminal_run
    page = (run_dir / REPORT_FILE).read_text()
    results = load_clip_results(run_dir / RESULTS_DIR)
    # gathered from both ranks in prompt order, each clip with the readings taken off it
    assert [r.prompt for r in results] == held_out_prompts(str(corpus / "val"), EVAL_PROMPTS)
    for result in results:
        assert result.clip.shape == (4, 16, 16, 3) and measure_clip(result.clip) == (
            result.color,
            result.motion,
        )
    scores = next(r for r in read_metrics(run_dir) if r.get("event") == "eval_synthetic")
    assert scores["num_clips"] == EVAL_PROMPTS
    assert scores["color_acc"] == sum(r.color_ok for r in results) / EVAL_PROMPTS
    assert scores["motion_acc"] == sum(r.motion_ok for r in results) / EVAL_PROMPTS

    figures = re.findall(r'<figure class="eval-clip">(.*?)</figure>', page)
    assert len(figures) == EVAL_PROMPTS
    images = embedded_images(page)
    assert f"{EVAL_PROMPTS} clips for {len({r.prompt for r in results})} held-out prompts" in page
    for number, (figure, result) in enumerate(zip(figures, results, strict=True), 1):
        caption = re.search(r"<figcaption>(.*)</figcaption>", figure).group(1)
        assert result.prompt in caption
        assert (
            f'colour: <span class="{"ok" if result.color_ok else "bad"}">{result.color or "none"}' in caption
        )
        assert (
            f'motion: <span class="{"ok" if result.motion_ok else "bad"}">{result.motion or "none"}'
            in caption
        )
        strip = np.asarray(images[f"generated clip {number}: {result.prompt}"].convert("RGB"))
        np.testing.assert_array_equal(strip, plots.frame_strip(result.clip, 6))  # 16×16 → 96×96, 4 frames


@pytest.mark.distributed
def test_each_evaluated_clip_is_the_one_a_single_process_makes_from_the_same_weights(terminal_run, corpus):
    """Prompt i's noise is seed + i on any layout: the run's evaluation (2 ranks, batches of 2) gives
    the clips of one process evaluating the final checkpoint's EMA weights in a single batch."""
    run_dir, _ = terminal_run
    model, config = load_model(resolve_checkpoint(run_dir))
    seed = json.loads((run_dir / "run_info.json").read_text())["config"]["seed"]
    prompts = held_out_prompts(str(corpus / "val"), EVAL_PROMPTS)
    with torch.inference_mode():
        alone = evaluate_clips(model, config, prompts, EVAL_PROMPTS, range(seed, seed + EVAL_PROMPTS))
    in_run = load_clip_results(run_dir / RESULTS_DIR)
    assert [r.prompt for r in in_run] == prompts
    for single, distributed in zip(alone, in_run, strict=True):
        np.testing.assert_array_equal(single.clip, distributed.clip)


@pytest.mark.distributed
def test_the_report_shows_the_samples_written_during_training(terminal_run):
    run_dir, _ = terminal_run
    page = (run_dir / REPORT_FILE).read_text()
    images = embedded_images(page)
    assert len(list((run_dir / "samples").glob("step_*/*.mp4"))) == 2
    for step in (1, 2):
        assert f"step {step}: “{PROMPT}”" in page
        assert images[f"sample at step {step}: {PROMPT}"].size == (4 * 96 + 3 * 2, 96)


@pytest.mark.distributed
def test_a_terminal_shows_a_live_progress_line(terminal_run):
    _, output = terminal_run
    redraws = output.split("\r")
    bar = r"step 2/2  loss \d+\.\d{4}  \d+\.\d clips/s  .*ETA \d\d:\d\d"
    assert any(re.fullmatch(bar, part.strip()) for part in redraws), output[-3000:]
    assert "step 2/2  loss" in output and "samples/s" in output  # the periodic lines stay


def test_a_report_that_fails_is_a_warning_not_an_error(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    assert report_run(tmp_path) is None
    captured = capsys.readouterr()
    assert captured.err.startswith("warning: report.html not written: JSONDecodeError")
    assert not (tmp_path / REPORT_FILE).exists() and "report:" not in captured.out


def test_the_report_command_works_on_an_existing_run_dir(tmp_path):
    rows = [{"step": s, "loss": 2.0 / s, "samples_per_s": 10.0 + s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = subprocess.run(
        [sys.executable, "-m", "sora_train.report", str(tmp_path), "--out", str(tmp_path / "r.html")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"report: {tmp_path / 'r.html'}"
    assert set(embedded_images((tmp_path / "r.html").read_text())) == {
        "Loss: training and validation loss over steps",
        "Throughput: clips/s over steps",
    }


def test_a_strip_enlarges_each_frame_by_nearest_neighbour_side_by_side():
    frames = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    strip = plots.frame_strip(frames, scale=4, gap=2)
    assert strip.shape == (5 * 4, 3 * 7 * 4 + 2 * 2, 3)
    for index, frame in enumerate(frames):
        left = index * (7 * 4 + 2)
        block = strip[:, left : left + 7 * 4]
        np.testing.assert_array_equal(block, frame.repeat(4, axis=0).repeat(4, axis=1))
        if index < len(frames) - 1:
            assert (strip[:, left + 7 * 4 : left + 7 * 4 + 2] == plots.GAP_VALUE).all()


def test_a_strip_png_shows_at_most_eight_frames_about_96_pixels_high():
    clip = np.arange(12, dtype=np.uint8)[:, None, None, None].repeat(16, 1).repeat(16, 2).repeat(3, 3)
    image = Image.open(io.BytesIO(plots.strip_png(clip)))
    assert image.size == (8 * 96 + 7 * 2, 96)
    shown = np.asarray(image)[0, :: 96 + 2, 0]  # each frame's value, the frame's index
    assert shown[0] == 0 and shown[-1] == 11 and len(shown) == 8 and (np.diff(shown) > 0).all()
    large = np.zeros((2, 200, 300, 3), np.uint8)
    assert Image.open(io.BytesIO(plots.strip_png(large))).size == (2 * 100 + 2, 67)  # thinned 3×


def test_the_sweep_figure_is_drawn_by_the_shared_plotting_module(tmp_path):
    for index, lr in enumerate(("1e-4", "3e-3")):
        run = tmp_path / str(index)
        run.mkdir()
        (run / "run_info.json").write_text(json.dumps({"overrides": [f"optim.lr={lr}"]}))
        rows = [
            {"step": 1, "loss": 1.0, "tokens_per_s": 100.0},
            {"event": "validation", "step": 1, "val_loss": 0.5 + index},
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sweep_main([str(tmp_path)]) == 0
    with Image.open(tmp_path / "sweep.png") as image:
        assert image.text["Software"] == plots.SOFTWARE and image.text["Title"] == "2 runs"


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_the_live_line_shows_step_loss_throughput_and_eta_in_a_terminal_only(monkeypatch):
    captured = io.StringIO()
    plain = LiveProgress(3, stream=captured)
    for step in (1, 2, 3):
        plain.update(step, 0.25, 12.0)
    assert captured.getvalue() == ""  # not a terminal: the log lines are the record

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    live = LiveProgress(3)
    live.update(1, 0.5, 10.0)
    assert sys.stdout is not terminal  # prints now go through tqdm, above the line
    print("step 1/3  loss 0.5000 ...")
    live.update(3, 0.25, 12.0)  # the last step ends it
    assert sys.stdout is terminal
    shown = terminal.getvalue().split("\r")
    assert "step 1/3  loss 0.5000 ...\n" in shown
    assert re.fullmatch(r"step 3/3  loss 0\.2500  12\.0 clips/s  .* ETA \d\d:\d\d\n", shown[-1])
