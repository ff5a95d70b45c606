"""`sora-prep shards` on real files: exact samples and rejects by reason, resume, lists, nodes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sora_train.data_prep.build_shards import split_of
from sora_train.data_prep.cli import main as prep_main
from sora_train.data_prep.encode import EncodeOptions, encode_shards

from sora_train.data.buckets import load_bucket_table
from sora_train.data.decode import ClipSpec, choose_indices
from sora_train.data.loader import LoaderSettings, VideoLoader
from sora_train.data.shards import iter_shard
from sora_train.data.storage import resolve_shards
from sora_train.data.supervised import WorkerFailure, supervised_map
from sora_train.video_io import read_video

from .video_files import write_audio_only, write_video

GOOD = {"good_a.mp4", "good_b.mp4", "sub/good_c.mkv", "rotated.mp4", "with_audio.mp4"}
EXPECTED_REJECTS = {
    "unreadable": 4,  # cut in half (its frame index at the end is lost), zero bytes, random bytes, text
    "truncated": 1,  # the frame index first, lists frames the file does not hold
    "no_video_stream": 1,
    "zero_frames": 1,
    "too_short": 1,  # one frame
    "too_small": 1,
    "bad_aspect_ratio": 1,
    "missing_caption": 1,
    "duplicate": 1,
    "timeout": 1,  # a FIFO: opening it blocks forever
}


def _caption(path: Path, text: str) -> Path:
    path.with_suffix(".txt").write_text(text, encoding="utf-8")
    return path


def make_mixed_folder(root: Path) -> Path:
    """Good videos of several sizes, aspect ratios, rates and containers, and one of each kind of bad input."""
    _caption(write_video(root / "good_a.mp4", 24, 48, 64, fps=8, seed=1), "a landscape gradient")
    good_b = write_video(root / "good_b.mp4", 30, 80, 48, fps=12, seed=2)
    good_b.with_suffix(".json").write_text('{"caption": "a portrait gradient"}', encoding="utf-8")
    _caption(
        write_video(root / "sub/good_c.mkv", 25, 48, 80, fps=10, seed=3, container_format="matroska"), "mkv"
    )
    _caption(write_video(root / "rotated.mp4", 16, 48, 64, fps=8, seed=4, rotation=90), "a phone video")
    _caption(write_video(root / "with_audio.mp4", 20, 64, 64, fps=8, seed=5, audio=True), "with sound")
    whole = (root / "good_a.mp4").read_bytes()
    _caption(root / "truncated.mp4", "cut short").write_bytes(whole[: len(whole) // 2])
    indexed_first = write_video(root / "fast.mp4", 24, 48, 64, seed=10, faststart=True).read_bytes()
    _caption(root / "fast.mp4", "cut short after its index").write_bytes(
        indexed_first[: len(indexed_first) * 9 // 10]
    )
    _caption(root / "zero_bytes.mp4", "empty").write_bytes(b"")
    _caption(root / "random.mp4", "noise").write_bytes(np.random.default_rng(0).bytes(5000))
    _caption(root / "text.mp4", "not a video").write_text("this is not a video\n" * 20)
    _caption(write_audio_only(root / "audio_only.mp4"), "only sound")
    _caption(
        write_video(root / "empty_stream.mkv", 0, 48, 64, audio=True, container_format="matroska"), "none"
    )
    _caption(write_video(root / "one_frame.mp4", 1, 48, 64, seed=6), "one frame")
    _caption(write_video(root / "tiny.mp4", 16, 16, 16, seed=7), "too small")
    _caption(write_video(root / "wide.mp4", 16, 32, 128, seed=8), "too wide")
    write_video(root / "no_caption.mp4", 16, 48, 64, seed=9)
    _caption(root / "zz_duplicate.mp4", "the same bytes as good_a").write_bytes(whole)
    os.mkfifo(root / "hangs.mp4")
    _caption(root / "hangs.mp4", "a file that never finishes reading")
    return root


def prep(*args: str) -> None:
    assert prep_main(["shards", *args]) == 0


def read_split(out: Path, split: str = "train") -> list[dict]:
    samples = []
    for shard in sorted((out / split).glob("*.tar")):
        samples.extend(iter_shard(str(shard)))
    return samples


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = make_mixed_folder(tmp_path_factory.mktemp("mixed"))
    out = tmp_path_factory.mktemp("mixed_out")
    prep("--src", str(root), "--out", str(out), "--min-side", "32", "--val-fraction", "0",
         "--timeout", "6", "--workers", "2", "--shard-size", "2")  # fmt: skip
    return root, out


def test_mixed_folder_gives_exact_samples_and_rejects(mixed_run):
    _, out = mixed_run
    manifest = json.loads((out / "manifest.json").read_text())
    samples = read_split(out)
    metas = [json.loads(s["json"]) for s in samples]
    assert {m["source"] for m in metas} == GOOD
    assert manifest["splits"]["train"]["shard_sizes"] == [2, 2, 1]
    assert manifest["rejects"] == EXPECTED_REJECTS
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert Counter(r["reason"] for r in rejects) == EXPECTED_REJECTS
    assert {r["source"] for r in rejects if r["reason"] == "duplicate"} == {"zz_duplicate.mp4"}
    assert {r["source"] for r in rejects if r["reason"] == "timeout"} == {"hangs.mp4"}
    assert manifest["inputs"] == {"accepted": 5, "rejected": sum(EXPECTED_REJECTS.values())}
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys) and all("." not in k and "/" not in k for k in keys)
    assert manifest["splits"]["train"]["samples"] == 5
    assert sum(manifest["splits"]["train"]["histograms"]["resolution"].values()) == 5


def test_samples_hold_original_bytes_or_an_upright_reencode(mixed_run):
    root, out = mixed_run
    by_source = {json.loads(s["json"])["source"]: s for s in read_split(out)}
    original = by_source["good_b.mp4"]
    assert original["mp4"] == (root / "good_b.mp4").read_bytes()
    meta = json.loads(original["json"])
    assert (meta["width"], meta["height"], meta["num_frames"], meta["fps"]) == (48, 80, 30, 12.0)
    assert meta["caption"] == "a portrait gradient" and meta["duration"] == 2.5
    rotated = by_source["rotated.mp4"]
    meta = json.loads(rotated["json"])
    assert (meta["width"], meta["height"], meta["source_rotation"]) == (48, 64, 90)
    frames, _ = read_video(rotated["mp4"])
    assert frames.shape == (16, 64, 48, 3)  # stored upright: portrait, as it is displayed


def test_interrupted_run_finishes_with_the_same_shards(tmp_path):
    root = tmp_path / "videos"
    for seed in range(5):
        _caption(write_video(root / f"clip_{seed}.mp4", 16 + 4 * seed, 48, 64, seed=seed), f"clip {seed}")
    _caption(write_video(root / "long.mp4", 48, 48, 64, seed=9), "a long video cut into three")
    _caption(root / "broken.mp4", "broken").write_bytes(b"\x00" * 100)
    args = ["--src", str(root), "--min-side", "32", "--clip-seconds", "2", "--val-fraction", "0.3",
            "--workers", "2", "--shard-size", "2"]  # fmt: skip
    prep(*args, "--out", str(tmp_path / "whole"))
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "whole", interrupted)
    # The state a crash leaves: a shard renamed but without its index, a partial shard, no manifest.
    train = interrupted / "train"
    (train / "shard-000001.index.json").unlink()
    (train / "shard-000002.tar").rename(train / "shard-000002.tar.partial")
    (train / "shard-000002.index.json").unlink()
    (interrupted / "manifest.json").unlink()
    (interrupted / "rejects.jsonl").unlink()
    for path in sorted((interrupted / "val").iterdir()):
        path.unlink()
    prep(*args, "--out", str(interrupted))
    whole_files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*"))
    assert whole_files == sorted(p.relative_to(interrupted) for p in interrupted.rglob("*"))
    for name in whole_files:
        if name.suffix == ".json" and name.name.startswith("manifest"):
            whole, resumed = (json.loads((d / name).read_text()) for d in (tmp_path / "whole", interrupted))
            assert whole == resumed
        elif (tmp_path / "whole" / name).is_file():
            assert (tmp_path / "whole" / name).read_bytes() == (interrupted / name).read_bytes(), name
    manifest = json.loads((interrupted / "manifest.json").read_text())
    assert manifest["rejects"] == {"unreadable": 1}
    keys = [s["__key__"] for split in ("train", "val") for s in read_split(interrupted, split)]
    assert len(keys) == 9  # 2, 2.5, 3, 3.5 and 4 s cut into 2 s clips: 1 + 1 + 1 + 1 + 2; 6 s: 3
    assert sum(e["num_samples"] for e in manifest["splits"].values()) == len(keys)
    long_clips = [k for k in keys if k.startswith("long-")]
    assert len(long_clips) == 3 and all(k.rsplit("-", 1)[1] in {"0000", "0001", "0002"} for k in long_clips)


# sora-prep that stops, alive, once its third shard is committed: the kill below then lands at that
# point whatever the machine's load (a run left alone finishes all 8 one-clip shards in seconds).
HOLD_AFTER_THIRD_SHARD = """
import sys, time
import sora_train.data_prep.build_shards as build_shards
from sora_train.data_prep.cli import main

commit = build_shards.SplitWriter.commit

def commit_then_hold(self, next_position):
    commit(self, next_position)
    if len(self.state.shards) == 3:
        time.sleep(3600)

build_shards.SplitWriter.commit = commit_then_hold
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_run_is_finished_by_a_rerun(tmp_path):
    """A real SIGKILL mid-run, then the same command again: same shards as an uninterrupted run."""
    import subprocess
    import sys

    root = tmp_path / "videos"
    for seed in range(8):
        _caption(write_video(root / f"clip_{seed}.mp4", 16, 48, 64, seed=seed), f"clip {seed}")
    args = [
        "--src",
        str(root),
        "--min-side",
        "32",
        "--val-fraction",
        "0",
        "--workers",
        "1",
        "--shard-size",
        "1",
    ]
    prep(*args, "--out", str(tmp_path / "whole"))
    command = [
        sys.executable,
        "-c",
        HOLD_AFTER_THIRD_SHARD,
        "shards",
        *args,
        "--out",
        str(tmp_path / "killed"),
    ]
    process = subprocess.Popen(command, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "killed" / "train").glob("shard-000002.index.json")):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists()
    prep(*args, "--out", str(tmp_path / "killed"))
    for shard in sorted((tmp_path / "whole" / "train").glob("*.tar")):
        assert shard.read_bytes() == (tmp_path / "killed" / "train" / shard.name).read_bytes()


def test_list_source_windows_and_split(tmp_path):
    write_video(tmp_path / "videos/long.mp4", 64, 48, 64, fps=8, seed=1)
    for seed in range(6):
        write_video(tmp_path / f"videos/v{seed}.mp4", 16, 48, 64, fps=8, seed=10 + seed)
    rows = ['{"path": "videos/long.mp4", "caption": "middle part", "start": 2.0, "end": 5.0}']
    rows += [json.dumps({"path": f"videos/v{seed}.mp4", "caption": f"video {seed}"}) for seed in range(6)]
    rows.append('{"path": "videos/missing.mp4", "caption": "not there"}')
    (tmp_path / "list.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    prep(
        "--src", str(tmp_path / "list.jsonl"), "--out", str(out), "--min-side", "32", "--val-fraction", "0.5"
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejects"] == {"unreadable": 1}
    for split in ("train", "val"):
        for sample in read_split(out, split):
            meta = json.loads(sample["json"])
            assert split_of(meta["source"], 0.5) == split
            if meta["source"] == "videos/long.mp4":
                # the window of the original bytes, and the frames those bytes hold (the whole source's)
                assert meta["frame_window"] == [16, 40] and meta["num_frames"] == 64
                window = ClipSpec(num_frames=4, stride=2, height=16, width=16, window="center")
                indices = choose_indices(64, window, np.random.default_rng(0), meta["frame_window"])
                assert indices.tolist() == [24, 26, 28, 30]  # the centre of frames 16..39
    assert manifest["splits"]["train"]["num_samples"] + manifest["splits"]["val"]["num_samples"] == 7
    # the loader and encode read the window's 24 frames the same way: a 9-frame bucket fits it (and the
    # 16-frame videos); counting the window from the wrong origin left it 8 frames, too short
    buckets = tmp_path / "buckets.yaml"
    buckets.write_text("stride: 1\nbuckets:\n  - {frames: 9, height: 32, width: 32}\n")
    table = load_bucket_table(buckets)
    for split in ("train", "val"):
        settings = LoaderSettings(table, (1,), seed=0, shuffle_window=1, cache_dir=tmp_path / "cache")
        loader = VideoLoader([resolve_shards(str(out / split))], settings)
        assert loader.rejected == {} and sum(loader.bucket_counts.values()) == len(read_split(out, split))
        latents = encode_shards(
            EncodeOptions(src=str(out / split), out=tmp_path / f"latents-{split}", buckets=str(buckets))
        )
        assert latents["skipped"] == {} and latents["num_samples"] == len(read_split(out, split))


def test_nodes_split_the_input_and_together_give_the_single_node_samples(tmp_path):
    root = tmp_path / "videos"
    for seed in range(6):
        _caption(write_video(root / f"clip_{seed}.mp4", 16, 48, 64, seed=seed), f"clip {seed}")
    common = ["--src", str(root), "--min-side", "32", "--val-fraction", "0", "--workers", "1"]
    prep(*common, "--out", str(tmp_path / "single"))
    for rank in (0, 1):
        prep(*common, "--out", str(tmp_path / "multi"), "--num-nodes", "2", "--node-rank", str(rank))
    single = sorted(s["__key__"] for s in read_split(tmp_path / "single"))
    multi = sorted(s["__key__"] for s in read_split(tmp_path / "multi"))
    assert single == multi and len(single) == 6
    names = sorted(p.name for p in (tmp_path / "multi").glob("manifest*.json"))
    assert names == ["manifest.node0000.json", "manifest.node0001.json"]


def _flaky(item: int) -> int:
    if item == 2:
        time.sleep(60)
    if item == 4:
        os.kill(os.getpid(), signal.SIGSEGV)
    return item * 10


def test_supervised_map_turns_hangs_and_crashes_into_failures_and_keeps_order():
    results = list(supervised_map(_flaky, range(7), workers=2, timeout=2))
    assert [item for item, _ in results] == list(range(7))
    assert [r for _, r in results if not isinstance(r, WorkerFailure)] == [0, 10, 30, 50, 60]
    assert results[2][1].reason == "timeout"
    assert results[4][1].reason == "decoder_crash" and "-11" in results[4][1].detail


def _signalled(item: int) -> int:
    """Sends this worker the signals SLURM and torchrun send a whole process group, then answers."""
    os.kill(os.getpid(), (signal.SIGUSR1, signal.SIGTERM)[item % 2])
    time.sleep(0.05)
    return item * 10


def test_workers_ignore_the_preemption_signals_sent_to_their_process_group():
    results = list(supervised_map(_signalled, range(6), workers=2, timeout=20))
    assert results == [(item, item * 10) for item in range(6)]


def test_bad_shard_size_is_one_clear_error(tmp_path, capsys):
    assert (
        prep_main(["shards", "--src", str(tmp_path), "--out", str(tmp_path / "o"), "--shard-size", "1TB"])
        == 2
    )
    assert "--shard-size '1TB'" in capsys.readouterr().err
