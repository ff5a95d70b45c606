"""The streaming loader: decoding, buckets, sources, rank split, exact and elastic resume."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sora_train.data.buckets import Bucket, BucketTable, batch_sizes_for
from sora_train.data.decode import ClipSpec, SkipSample, decode_clip, fit_frames, to_unit_range
from sora_train.data.loader import LoaderSettings, VideoLoader, merge_loader_states
from sora_train.data.storage import ShardError, resolve_shards
from sora_train.video_io import encode_mp4

SPEC = ClipSpec(num_frames=4, stride=2, height=16, width=16)
TABLE = BucketTable((Bucket(4, 16, 16),), stride=2)


def settings(batch: int = 3, workers: int = 0, **overrides) -> LoaderSettings:
    return replace(
        LoaderSettings(TABLE, (batch,), seed=7, shuffle_window=8, num_workers=workers), **overrides
    )


def make_loader(corpus: Path, rank: int = 0, world: int = 1, workers: int = 0, batch: int = 3) -> VideoLoader:
    return VideoLoader([resolve_shards(str(corpus / "train"))], settings(batch, workers), rank, world)


def take(loader: VideoLoader, batches: int) -> list[list[str]]:
    iterator = iter(loader)
    keys = [next(iterator)["key"] for _ in range(batches)]
    iterator.close()
    return keys


def rest_of_epoch(loader: VideoLoader, epoch: int = 0) -> list[str]:
    """Keys of the loader's remaining batches of `epoch` (it stops at the first batch of the next)."""
    keys = []
    iterator = iter(loader)
    for batch in iterator:
        if batch["epoch"] != epoch:
            break
        keys.extend(batch["key"])
    iterator.close()
    return keys


def moving_frames(num_frames: int, height: int = 32, width: int = 40) -> np.ndarray:
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        frames[i, 8:20, 2 + i : 14 + i, 0] = 255
    return frames


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def video_meta(text: str, frames: int = 12, height: int = 32, width: int = 40, **extra) -> bytes:
    return json.dumps(
        {"caption": text, "num_frames": frames, "height": height, "width": width, "fps": 8, **extra}
    ).encode()


def test_loader_reads_generated_corpus(corpus):
    batch = next(iter(make_loader(corpus, batch=4)))
    assert batch["x"].shape == (4, 3, 4, 16, 16) and batch["x"].dtype == torch.uint8
    assert batch["x"].amax() > 200  # a bright object, not an empty frame
    assert all("moving" in c for c in batch["caption"]) and len(set(batch["key"])) == 4
    assert batch["bucket"] == "4x16x16" and batch["epoch"] == 0


def test_an_epoch_covers_every_sample_once_in_a_seeded_order(corpus):
    first, second = rest_of_epoch(make_loader(corpus)), rest_of_epoch(make_loader(corpus))
    assert first == second and len(first) == len(set(first)) == 64
    other_seed = VideoLoader([resolve_shards(str(corpus / "train"))], settings(seed=8))
    assert rest_of_epoch(other_seed) != first


def test_a_corpus_without_usable_samples_is_an_error_not_a_hang(tmp_path):
    shard = tmp_path / "bad.tar"
    write_tar(shard, {"a.mp4": b"garbage", "a.json": video_meta("x"), "b.json": video_meta("no video")})
    with pytest.raises(ShardError, match="an epoch's worth of batches without one usable sample"):
        next(iter(VideoLoader([[str(shard)]], settings(batch=2))))
    write_tar(shard, {"b.json": video_meta("no video")})
    with pytest.raises(ShardError, match=r"no usable sample in 1 shards .*'missing_video': 1"):
        VideoLoader([[str(shard)]], settings())


def test_truncated_shard_keeps_its_complete_samples(tmp_path, corpus):
    shards = resolve_shards(str(corpus / "train"))
    broken = tmp_path / "broken.tar"
    broken.write_bytes(Path(shards[0]).read_bytes()[:20000])
    loader = VideoLoader([[str(broken), shards[1]]], settings(batch=4))
    keys = rest_of_epoch(loader)
    assert loader.rejected["corrupt_shard"] == 1
    assert len(keys) == len(set(keys)) and 8 < len(keys) < 16  # shard 1 whole, shard 0 up to the damage


def test_decode_clip_resizes_without_distortion():
    frames = moving_frames(10, 32, 64)
    clip = decode_clip(encode_mp4(frames), ClipSpec(4, 2, 16, 16), np.random.default_rng(0))
    assert clip.shape == (3, 4, 16, 16)
    with pytest.raises(SkipSample) as info:
        decode_clip(encode_mp4(frames), ClipSpec(8, 2, 16, 16), np.random.default_rng(0))
    assert info.value.reason == "too_short"
    square = to_unit_range(fit_frames(np.full((1, 20, 40, 3), 255, np.uint8), 10, 10))
    assert square.shape == (3, 1, 10, 10) and torch.allclose(square, torch.ones_like(square))


def test_decord_fallback_for_widths_decord_cannot_read():
    # decord fails on some frame widths (48 among them); PyAV decodes those instead of a skip.
    clip = decode_clip(encode_mp4(moving_frames(8, 32, 48)), SPEC, np.random.default_rng(0))
    assert clip.shape == (3, 4, 16, 16) and clip.amax() > 0.5


def test_rotated_videos_decode_upright_on_both_decoders(tmp_path):
    from tests.video_files import write_video

    for width in (64, 48):  # decord reads 64 wide; 48 goes through the PyAV fallback
        path = write_video(tmp_path / f"rot{width}.mp4", 12, 32, width, rotation=90)
        frames = decode_clip(path.read_bytes(), ClipSpec(4, 2, width, 32), np.random.default_rng(0))
        upright = decode_clip(
            write_video(tmp_path / f"up{width}.mp4", 12, 32, width).read_bytes(),
            ClipSpec(4, 2, 32, width), np.random.default_rng(0),
        )  # fmt: skip
        assert frames.shape == (3, 4, width, 32)
        assert torch.allclose(frames, torch.rot90(upright, k=1, dims=(2, 3)), atol=0.15)


def test_ranks_read_disjoint_batches(corpus):
    per_rank = [set(rest_of_epoch(make_loader(corpus, rank, 2, batch=4))) for rank in (0, 1)]
    assert not per_rank[0] & per_rank[1] and len(per_rank[0] | per_rank[1]) == 64


def test_pipe_sources_are_refused_unless_allowed(tmp_path, corpus):
    with pytest.raises(ShardError, match="run a shell"):
        resolve_shards("pipe:curl http://example/shard.tar")
    shard = resolve_shards(str(corpus / "train"))[0]
    urls = resolve_shards(f"pipe:cat {shard}", allow_pipe=True)
    loader = VideoLoader([urls], settings(batch=4, cache_dir=tmp_path / "cache"))
    assert sorted(rest_of_epoch(loader)) == sorted(rest_of_epoch(VideoLoader([[shard]], settings(batch=4))))


def test_object_store_urls_read_by_byte_range(corpus):
    import fsspec

    memory = fsspec.filesystem("memory")
    for shard in resolve_shards(str(corpus / "train")):
        memory.pipe(f"/store/train/{Path(shard).name}", Path(shard).read_bytes())
    urls = resolve_shards("memory://store/train/shard-{000000..000007}.tar")
    assert len(urls) == 8 and resolve_shards("memory://store/train") == urls
    remote = rest_of_epoch(VideoLoader([urls], settings()))
    assert remote == rest_of_epoch(make_loader(corpus))
    with pytest.raises(ShardError, match="1 of 9 shards are missing"):
        resolve_shards("memory://store/train/shard-{000000..000008}.tar")


@pytest.mark.parametrize(
    ("width", "height", "frames", "expected"),
    [
        (1280, 720, 81, "33x256x448"),  # 16:9 with frames for the longest bucket
        (1280, 720, 40, "17x256x448"),  # 16:9, too short for 33 frames at stride 2
        (720, 1280, 81, "33x448x256"),  # portrait
        (500, 500, 81, "33x320x320"),  # square
        (1000, 760, 81, "33x288x384"),  # 4:3-ish
        (200, 120, 81, "too_small"),  # every 16:9 bucket needs > 2x enlargement
        (1280, 720, 20, "too_short"),  # 20 source frames < 33 needed at stride 2
        (1280, 720, 1, "too_short"),  # an image in a video-only table
    ],
)
def test_bucket_assignment(width, height, frames, expected):
    table = BucketTable(
        tuple(Bucket(f, h, w) for f in (17, 33) for h, w in ((256, 448), (448, 256), (320, 320), (288, 384))),
        stride=2,
    )
    placed = table.place(width, height, frames, max_upscale=2.0)
    assert (placed.name if isinstance(placed, Bucket) else placed) == expected


def test_images_go_to_image_buckets_and_frame_rate_sets_the_stride():
    table = BucketTable((Bucket(1, 64, 64), Bucket(9, 64, 64)), stride=1)
    assert table.place(100, 100, 1).name == "1x64x64"
    assert table.place(100, 100, 30).name == "9x64x64"
    assert table.place(100, 100, 30, stride=4) == "too_short"  # needs (9-1)*4+1 = 33 frames


def test_token_budget_batch_sizes():
    table = BucketTable(
        (Bucket(1, 64, 64), Bucket(9, 64, 64), Bucket(17, 64, 64), Bucket(17, 128, 128, batch_size=3)),
        stride=1,
    )

    def tokens(bucket: Bucket) -> int:  # pixel space, patch (1, 8, 8)
        return bucket.frames * (bucket.height // 8) * (bucket.width // 8)

    assert batch_sizes_for(table, 2048, tokens, default=4) == (32, 3, 1, 3)
    assert batch_sizes_for(table, 0, tokens, default=4) == (4, 4, 4, 3)
    with pytest.raises(ValueError, match="17x64x64 has 1088 tokens per sample, more than the budget of 1000"):
        batch_sizes_for(table, 1000, tokens, default=4)


def test_bucketed_batches_are_shape_homogeneous_with_token_budget_sizes(tmp_path):
    members = {}
    for i, (height, width) in enumerate([(32, 64)] * 12 + [(64, 32)] * 12 + [(40, 40)] * 6):
        members[f"v{i:03d}.mp4"] = encode_mp4(moving_frames(12, height, width))
        members[f"v{i:03d}.json"] = video_meta(f"clip {i}", 12, height, width)
    write_tar(tmp_path / "mixed.tar", members)
    table = BucketTable((Bucket(4, 16, 32), Bucket(4, 32, 16), Bucket(4, 24, 24)), stride=2)
    loader = VideoLoader(
        [[str(tmp_path / "mixed.tar")]], LoaderSettings(table, (4, 4, 2), seed=1, shuffle_window=30)
    )
    seen: dict[str, list[int]] = {}
    iterator = iter(loader)
    for batch in iterator:
        if batch["epoch"]:
            break
        frames, height, width = map(int, batch["bucket"].split("x"))
        assert batch["x"].shape[1:] == (3, frames, height, width)
        seen.setdefault(batch["bucket"], []).append(len(batch["key"]))
    iterator.close()
    assert seen == {"4x16x32": [4, 4, 4], "4x32x16": [4, 4, 4], "4x24x24": [2, 2, 2]}


def test_bucket_weights_subsample_a_bucket():
    table = BucketTable((Bucket(4, 16, 16), Bucket(4, 16, 32, weight=0.25)))
    assert table.buckets[1].weight == 0.25
    from sora_train.data.plan import EpochPlanner

    buckets = np.array([0] * 400 + [1] * 400, np.int16)
    planner = EpochPlanner(0, np.array([0, 800]), buckets, (4, 4), (1.0, 0.25), seed=0, window=64)
    kept = [int(s) for batch in planner.plan_block(0, 0) for s in batch.samples]
    assert planner.blocks == 1 and len(kept) == len(set(kept))
    assert sum(s < 400 for s in kept) == 400 and sum(s >= 400 for s in kept) == 100


def test_images_and_videos_mix_at_the_configured_ratio(tmp_path, corpus):
    from PIL import Image

    members = {}
    for i in range(24):
        buffer = io.BytesIO()
        Image.fromarray(np.full((20, 30, 3), 10 * i, np.uint8)).save(buffer, format="PNG")
        members[f"img{i:03d}.png"], members[f"img{i:03d}.txt"] = buffer.getvalue(), f"image {i}".encode()
    write_tar(tmp_path / "images" / "images-000.tar", members)
    table = BucketTable((Bucket(4, 16, 16), Bucket(1, 16, 16)), stride=2)
    loader = VideoLoader(
        [resolve_shards(str(corpus / "train")), resolve_shards(str(tmp_path / "images"))],
        LoaderSettings(table, (3, 6), seed=0, shuffle_window=16, image_ratio=0.25),
    )
    iterator = iter(loader)
    batches = [next(iterator) for _ in range(12)]
    iterator.close()
    assert [b["source"] for b in batches] == [0, 0, 0, 1] * 3
    images = [b for b in batches if b["source"] == 1]
    assert all(b["x"].shape == (6, 3, 1, 16, 16) and b["caption"][0].startswith("image") for b in images)


def test_index_is_cached_and_rebuilt_when_a_shard_changes(tmp_path, corpus):
    shard = tmp_path / "one.tar"
    shutil.copy(resolve_shards(str(corpus / "train"))[0], shard)
    cache = tmp_path / "cache"
    VideoLoader([[str(shard)]], settings(cache_dir=cache))
    assert len(list((cache / "index").glob("*.idx"))) == 1
    write_tar(shard, {"a.mp4": encode_mp4(moving_frames(12)), "a.json": video_meta("changed")})
    assert len(VideoLoader([[str(shard)]], settings(cache_dir=cache)).indexes[0]) == 1


@pytest.mark.parametrize(("workers", "stops"), [(0, (1, 7, 22)), (2, (4, 22))])
def test_resume_continues_the_exact_batch_sequence(corpus, workers, stops):
    reference = take(make_loader(corpus), 30)  # 90 samples: crosses the end of the 64-sample epoch
    for stop in stops:
        first = make_loader(corpus, workers=workers)
        assert take(first, stop) == reference[:stop]
        resumed = make_loader(corpus, workers=workers)
        resumed.load_state_dict(first.state_dict())
        assert take(resumed, 30 - stop) == reference[stop:], f"resumed after {stop} batches"


def test_resume_reads_no_consumed_sample(corpus, monkeypatch):
    from sora_train.data import loader as loader_module

    first = make_loader(corpus)
    take(first, 5)
    loaded = []
    original = loader_module.load_example

    def counting(sample_settings, task):
        loaded.append(task.start)
        return original(sample_settings, task)

    monkeypatch.setattr(loader_module, "load_example", counting)
    resumed = make_loader(corpus)
    resumed.load_state_dict(first.state_dict())
    take(resumed, 2)
    assert len(loaded) == 6  # the 2 new batches only, not the 15 samples consumed before


@pytest.mark.parametrize(("before", "after"), [(1, 2), (2, 1)])
def test_elastic_resume_covers_the_epoch_exactly_once(corpus, before, after):
    consumed = []
    states = []
    for rank in range(before):
        loader = make_loader(corpus, rank, before)
        consumed += [k for batch in take(loader, 3 + 2 * rank) for k in batch]  # ranks stop unevenly
        states.append(loader.state_dict())
    merged = merge_loader_states(states)
    remaining = []
    for rank in range(after):
        loader = make_loader(corpus, rank, after, workers=0)
        loader.load_state_dict(merged)
        remaining.append(rest_of_epoch(loader))
    everything = consumed + [k for keys in remaining for k in keys]
    assert sorted(everything) == sorted(rest_of_epoch(make_loader(corpus)))  # 64 samples, each once
    again = make_loader(corpus, 0, after)
    again.load_state_dict(merge_loader_states(states))
    assert rest_of_epoch(again) == remaining[0]  # the new order is deterministic


def test_a_rank_state_cannot_resume_another_world(corpus):
    state = make_loader(corpus, world=1).state_dict()
    with pytest.raises(ValueError, match="merge every rank's state"):
        make_loader(corpus, rank=0, world=2).load_state_dict(state)
    with pytest.raises(ValueError, match="data plan changed"):
        make_loader(corpus, batch=4).load_state_dict(state)
