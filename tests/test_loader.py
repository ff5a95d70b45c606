"""The streaming loader: decoding, skips counted by reason, rank split, exact resume."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sora_train.data import loader as loader_module
from sora_train.data.decode import ClipSpec, SkipSample, decode_clip, resize_crop
from sora_train.data.loader import VideoLoader
from sora_train.data.shards import ShardError, resolve_shards
from sora_train.video_io import encode_mp4

SPEC = ClipSpec(num_frames=4, stride=2, height=16, width=16)


def take(loader: VideoLoader, batches: int) -> list[list[str]]:
    iterator = iter(loader)
    return [next(iterator)["key"] for _ in range(batches)]


def make_loader(corpus: Path, rank: int = 0, world: int = 1, workers: int = 0, batch: int = 3) -> VideoLoader:
    return VideoLoader(resolve_shards(str(corpus / "train")), SPEC, batch, 7, rank, world, workers, 8)


def moving_frames(num_frames: int, height: int = 32, width: int = 40) -> np.ndarray:
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        frames[i, 8:20, 2 + i : 14 + i, 0] = 255
    return frames


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def caption(text: str) -> bytes:
    return json.dumps({"caption": text}).encode()


def test_loader_reads_generated_corpus(corpus):
    batch = next(iter(make_loader(corpus, batch=4)))
    assert batch["x"].shape == (4, 3, 4, 16, 16) and batch["x"].dtype == torch.float32
    assert batch["x"].min() >= -1.0 and batch["x"].max() <= 1.0
    assert batch["x"].amax() > 0.5  # a bright object, not an empty frame
    assert all("moving" in c for c in batch["caption"]) and len(set(batch["key"])) == 4


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path):
    good = encode_mp4(moving_frames(12))
    shard = tmp_path / "shards" / "shard-000000.tar"
    shard.parent.mkdir()
    write_tar(shard, {
        "good1.mp4": good, "good1.json": caption("a red square"),
        "corrupt.mp4": b"\x00\x00\x00\x18ftypmp42 this is not a video", "corrupt.json": caption("broken"),
        "short.mp4": encode_mp4(moving_frames(3)), "short.json": caption("too short"),
        "nocaption.mp4": good, "nocaption.json": json.dumps({"fps": 8}).encode(),
        "badjson.mp4": good, "badjson.json": b"{not json",
        "novideo.json": caption("no video member"),
        "good2.mp4": good, "good2.json": caption("a red square"),
    })  # fmt: skip
    loader = VideoLoader([str(shard)], SPEC, 2, 0, 0, 1, 0, 1)
    batch = next(iter(loader))
    assert batch["key"] == ["good1", "good2"]
    assert loader.skip_counts() == {
        "decode_error": 1, "too_short": 1, "missing_caption": 1, "bad_metadata": 1, "missing_video": 1
    }  # fmt: skip
    assert torch.isfinite(batch["x"]).all() and batch["x"].amax() > 0.5  # real frames, not zeros


def test_a_corpus_without_usable_samples_is_an_error_not_a_hang(tmp_path):
    shard = tmp_path / "bad.tar"
    write_tar(shard, {"a.mp4": b"garbage", "a.json": caption("x"), "b.json": caption("no video")})
    with pytest.raises(
        ShardError, match=r"no usable sample in 1 shards .*'decode_error': 1, 'missing_video': 1"
    ):
        next(iter(VideoLoader([str(shard)], SPEC, 2, 0, 0, 1, 0, 1)))


def test_truncated_shard_is_counted_not_fatal(tmp_path, corpus):
    shards = resolve_shards(str(corpus / "train"))
    broken = tmp_path / "broken.tar"
    broken.write_bytes(Path(shards[0]).read_bytes()[:5000])
    loader = VideoLoader([str(broken), shards[1]], SPEC, 4, 0, 0, 1, 0, 1)
    keys = [k for k in take(loader, 2) for k in k]
    assert loader.skip_counts().get("corrupt_shard") == 1
    assert len(keys) == len(set(keys)) == 8


def test_decode_clip_resizes_without_distortion():
    frames = moving_frames(10, 32, 64)
    clip = decode_clip(encode_mp4(frames), ClipSpec(4, 2, 16, 16), np.random.default_rng(0))
    assert clip.shape == (3, 4, 16, 16)
    with pytest.raises(SkipSample) as info:
        decode_clip(encode_mp4(frames), ClipSpec(8, 2, 16, 16), np.random.default_rng(0))
    assert info.value.reason == "too_short"
    square = resize_crop(np.full((1, 20, 40, 3), 255, np.uint8), 10, 10)
    assert square.shape == (3, 1, 10, 10) and torch.allclose(square, torch.ones_like(square))


def test_decord_fallback_for_widths_decord_cannot_read():
    # decord fails on some frame widths (48 among them); PyAV decodes those instead of a skip.
    clip = decode_clip(encode_mp4(moving_frames(8, 32, 48)), SPEC, np.random.default_rng(0))
    assert clip.shape == (3, 4, 16, 16) and clip.amax() > 0.5


def test_ranks_and_workers_read_disjoint_samples(corpus):
    per_rank = [
        {k for b in take(make_loader(corpus, rank, 2, workers=2, batch=4), 6) for k in b} for rank in (0, 1)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 24
    assert not per_rank[0] & per_rank[1]


def test_too_few_shards_is_a_clear_error(corpus):
    shards = resolve_shards(str(corpus / "train"))[:2]
    with pytest.raises(ShardError, match="2 shards cannot feed 2 data-parallel ranks × 2 loader workers"):
        VideoLoader(shards, SPEC, 2, 0, 0, 2, 2, 8)


def test_pipe_sources_are_refused():
    with pytest.raises(ShardError, match="run a shell"):
        resolve_shards("pipe:curl http://example/shard.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_exact_batch_sequence(corpus, workers):
    reference = take(make_loader(corpus, workers=workers), 30)  # 90 samples: crosses an epoch boundary
    first = make_loader(corpus, workers=workers)
    iterator = iter(first)
    for _ in range(11):
        next(iterator)
    state = first.state_dict()
    resumed = make_loader(corpus, workers=workers)
    resumed.load_state_dict(state)
    assert take(resumed, 19) == reference[11:]


def test_resume_skips_consumed_samples_without_decoding(corpus, monkeypatch):
    first = make_loader(corpus)
    take(first, 5)
    decoded = []

    def counting_decode(data, spec, rng, window=None):
        decoded.append(1)
        return decode_clip(data, spec, rng, window)

    monkeypatch.setattr(loader_module, "decode_clip", counting_decode)
    resumed = make_loader(corpus)
    resumed.load_state_dict(first.state_dict())
    take(resumed, 2)
    assert len(decoded) == 6  # the 2 new batches only, not the 15 samples consumed before


def test_resume_with_different_world_is_refused(corpus):
    state = make_loader(corpus, world=1).state_dict()
    with pytest.raises(ValueError, match="resume with the same settings"):
        make_loader(corpus, rank=0, world=2).load_state_dict(state)
