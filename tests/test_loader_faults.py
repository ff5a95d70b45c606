"""Bad data cannot take the loader down: exact skip counts by reason, and a hang costs one timeout."""

from __future__ import annotations

import json
import os
from collections import Counter
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from sora_train.data import index as shard_index
from sora_train.data.buckets import Bucket, BucketTable
from sora_train.data.index import scan_cache_path, scan_shard
from sora_train.data.loader import LoaderSettings, VideoLoader
from sora_train.data.sample_index import from_scan, write_sample_index
from sora_train.video_io import encode_mp4

from .test_loader import moving_frames, video_meta, write_tar

TABLE = BucketTable((Bucket(4, 16, 16),), stride=2)
PER_KIND = 25
# kind -> (where it is caught, reason)
BAD_KINDS = {
    "bad_json": ("index", "bad_metadata"),
    "no_caption": ("index", "missing_caption"),
    "no_video": ("index", "missing_video"),
    "short": ("index", "too_short"),
    "tiny": ("index", "too_small"),
    "garbage": ("decode", "decode_error"),
    "empty_mp4": ("decode", "decode_error"),
    "lying_count": ("decode", "too_short"),  # json claims 12 frames, the video has 3
}


def variable_frame_rate_mp4(num_frames: int) -> bytes:
    """An H.264 mp4 whose frame durations vary (1, 2 or 3 ticks)."""
    path = Path(os.environ["SORA_CACHE_DIR"]) / f"vfr{os.getpid()}.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 40, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 24)
        pts = 0
        for i, pixels in enumerate(moving_frames(num_frames)):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 24)
            pts += 1 + i % 3
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    path.unlink()
    return data


def bad_sample(kind: str, key: str, good: bytes) -> dict[str, bytes]:
    meta = video_meta(f"{kind} sample")
    return {
        "bad_json": {f"{key}.mp4": good, f"{key}.json": b"{not json"},
        "no_caption": {f"{key}.mp4": good, f"{key}.json": json.dumps({"num_frames": 12}).encode()},
        "no_video": {f"{key}.json": meta},
        "short": {f"{key}.mp4": encode_mp4(moving_frames(3)), f"{key}.json": video_meta("short", frames=3)},
        "tiny": {f"{key}.mp4": good, f"{key}.json": video_meta("tiny", height=6, width=6)},
        "garbage": {f"{key}.mp4": b"\x00\x00\x00\x18ftypmp42 not a video at all", f"{key}.json": meta},
        "empty_mp4": {f"{key}.mp4": b"", f"{key}.json": meta},
        "lying_count": {f"{key}.mp4": encode_mp4(moving_frames(3)), f"{key}.json": meta},
    }[kind]


def test_two_hundred_bad_samples_are_counted_exactly_by_reason(tmp_path):
    good, odd = encode_mp4(moving_frames(12)), variable_frame_rate_mp4(12)
    rng = np.random.default_rng(0)
    samples = [("good", {"mp4": good})] * 190 + [("vfr", {"mp4": odd})] * 10
    samples += [(kind, None) for kind in BAD_KINDS for _ in range(PER_KIND)]
    order = rng.permutation(len(samples))
    shards: list[dict[str, bytes]] = [{} for _ in range(8)]
    for position, index in enumerate(order):
        kind, media = samples[index]
        key = f"s{position:04d}_{kind}"
        members = bad_sample(kind, key, good) if media is None else {
            f"{key}.mp4": media["mp4"], f"{key}.json": video_meta(f"{kind} clip")
        }  # fmt: skip
        shards[position % 8].update(members)
    for number, members in enumerate(shards):
        write_tar(tmp_path / f"shard-{number:03d}.tar", members)
    urls = sorted(str(p) for p in tmp_path.glob("shard-*.tar"))

    settings = LoaderSettings(TABLE, (8,), seed=3, shuffle_window=64, max_upscale=2.0, num_workers=2)
    loaders = [VideoLoader([urls], settings, rank, 2) for rank in (0, 1)]
    planned = loaders[0].mixture.planners[0].epoch_length(0)  # batches in epoch 0, over both ranks
    keys: list[str] = []
    steps = []
    for loader in loaders:  # each rank consumes exactly its share of epoch 0
        iterator, batches = iter(loader), 0
        while loader.cursor.position(loader.cursor.taken) < planned:
            batch = next(iterator)
            keys += batch["key"]
            batches += 1
            assert batch["x"].amax() > 200 and batch["x"].shape[1:] == (3, 4, 16, 16)  # real frames
        iterator.close()
        steps.append(batches)

    expected_index = Counter()
    expected_decode = Counter()
    for where, reason in BAD_KINDS.values():
        (expected_index if where == "index" else expected_decode)[reason] += PER_KIND
    assert +loaders[0].rejected == expected_index
    assert Counter(loaders[0].skip_counts()) + Counter(loaders[1].skip_counts()) == expected_decode
    assert sorted(keys) == sorted(
        f"s{p:04d}_{samples[i][0]}" for p, i in enumerate(order) if samples[i][0] in ("good", "vfr")
    )
    assert abs(steps[0] - steps[1]) <= 1  # the epoch's batches are dealt evenly; the stream never ends
    for loader in loaders:  # and every rank can take as many more steps as the trainer asks for
        iterator = iter(loader)
        for _ in range(planned):
            next(iterator)
        iterator.close()


def test_a_hanging_read_costs_one_timeout(tmp_path, corpus, monkeypatch):
    """A shard whose reads block (a hung network mount, simulated with a FIFO) costs a timeout per sample."""
    real = sorted((corpus / "train").glob("*.tar"))[0]
    fifo = tmp_path / "hung.tar"
    os.mkfifo(fifo)
    scan = scan_shard(str(real))
    scan["samples"] = scan["samples"][:1]  # one sample, whose bytes never come
    cache = tmp_path / "cache"
    path = scan_cache_path(str(fifo), str(fifo), cache)
    path.parent.mkdir(parents=True)
    size = real.stat().st_size  # what the FIFO's index says its shard holds
    write_sample_index(path, from_scan(scan, size, probe=0))
    monkeypatch.setattr(shard_index, "shard_bytes", lambda location: size)
    settings = LoaderSettings(
        TABLE, (3,), seed=0, shuffle_window=4, num_workers=2, decode_timeout=3.0, cache_dir=cache
    )
    loader = VideoLoader([[str(real), str(fifo)]], settings)
    planned = loader.mixture.planners[0].epoch_length(0)
    keys = []
    iterator = iter(loader)
    while loader.cursor.position(loader.cursor.taken) < planned:  # exactly epoch 0
        keys += next(iterator)["key"]
    iterator.close()
    assert loader.skip_counts() == {"timeout": 1}
    assert len(keys) == 8  # every sample of the readable shard
