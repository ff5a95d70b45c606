"""The synthetic moving-shapes corpus, its `sora-prep` command and its clip metrics."""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from einops import rearrange
from sora_train.data_prep import cli

from sora_train.data.synthetic import (
    CORPUS_VERSION,
    FRAME_SIZES,
    ensure_corpus,
    generate_corpus,
    render_clip,
    shard_urls,
)
from sora_train.data.synthetic_captions import (
    COLORS,
    COMBINATIONS,
    DIRECTIONS,
    HELD_OUT_COMBINATIONS,
    SHAPES,
    TRAINING_COMBINATIONS,
    caption_for,
    parse_caption,
)
from sora_train.eval.synthetic_metrics import measure_clip, score_clips
from sora_train.video_io import encode_mp4, read_video

NUM_TRAIN, NUM_VAL, PER_SHARD = 40, 72, 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synthetic")
    manifest = generate_corpus(
        root, num_train=NUM_TRAIN, num_val=NUM_VAL, samples_per_shard=PER_SHARD, min_frames=8, max_frames=12
    )
    return root, manifest


def read_shard(path: str) -> dict[str, dict[str, bytes]]:
    """Members of a tar shard grouped by sample key: {key: {extension: bytes}}."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, extension = member.name.split(".", 1)
            samples[key][extension] = tar.extractfile(member).read()
    return dict(samples)


def random_clips(seed: int, repeats: int = 1) -> tuple[list[np.ndarray], list[str]]:
    """Every (color, shape, direction) rendered `repeats` times at random sizes and lengths."""
    rng = np.random.default_rng(seed)
    clips, captions = [], []
    for color, shape, direction in COMBINATIONS * repeats:
        height, width = FRAME_SIZES[rng.integers(len(FRAME_SIZES))]
        clips.append(render_clip(color, shape, direction, height, width, int(rng.integers(16, 33)), rng))
        captions.append(caption_for(color, shape, direction))
    return clips, captions


def as_trainer_sees(clip: np.ndarray, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """Centre-crop to a square, downscale to size x size, blur, add Gaussian noise (sigma 20)."""
    _, height, width, _ = clip.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    video = torch.from_numpy(clip[:, top : top + side, left : left + side]).float()
    video = rearrange(video, "f h w c -> f c h w")
    video = F.interpolate(video, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    video = F.avg_pool2d(video, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    noisy = rearrange(video, "f c h w -> f h w c").numpy() + rng.normal(0.0, 20.0, (len(clip), size, size, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def test_vocabulary() -> None:
    assert COLORS["red"] == (255, 0, 0) and COLORS["magenta"] == (255, 0, 255) and len(COLORS) == 6
    assert len(COMBINATIONS) == len(set(COMBINATIONS)) == 72
    assert all(height % 2 == 0 and width % 2 == 0 for height, width in FRAME_SIZES)
    assert {height > width for height, width in FRAME_SIZES} == {True, False}, "need landscape and portrait"


def test_captions_round_trip() -> None:
    assert caption_for("red", "square", "left") == "a red square moving left on a black background"
    for combination in COMBINATIONS:
        assert parse_caption(caption_for(*combination)) == combination


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "a red square",
        "a purple square moving left on a black background",
        "a red cube moving up on a black background",
    ],
)
def test_parse_caption_rejects(caption: str) -> None:
    with pytest.raises(ValueError, match="caption"):
        parse_caption(caption)


@pytest.mark.parametrize(("height", "width"), FRAME_SIZES)
def test_every_frame_size_decodes_with_decord(height: int, width: int) -> None:
    decord = pytest.importorskip("decord")  # no wheels for aarch64
    clip = render_clip("cyan", "circle", "right", height, width, 9, np.random.default_rng(0))
    reader = decord.VideoReader(io.BytesIO(encode_mp4(clip)), num_threads=1)
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    assert frames.shape == (9, height, width, 3)


@pytest.mark.parametrize(("height", "width"), FRAME_SIZES)
def test_render_keeps_object_in_central_square(height: int, width: int) -> None:
    rng = np.random.default_rng(height * 1000 + width)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    for color, shape, direction in COMBINATIONS:
        clip = render_clip(color, shape, direction, height, width, 16, rng)
        assert clip.shape == (16, height, width, 3) and clip.dtype == np.uint8
        lit = clip.any(axis=-1)
        assert np.all(clip[lit] == COLORS[color]), "object must be one flat colour on exact black"
        assert lit[:, top : top + side, left : left + side].sum() == lit.sum(), "object left the crop"
        rows, cols = np.nonzero(lit[0])
        extent = max(np.ptp(rows), np.ptp(cols)) + 1
        assert 0.3 * side <= extent <= 0.47 * side, f"{shape} is {extent}px in a {side}px square"
        start, end = (np.argwhere(frame).mean(axis=0) for frame in (lit[0], lit[-1]))
        travel = np.abs(end - start).max()
        assert 0.38 * side <= travel <= 0.57 * side, f"{shape} moved {travel:.1f}px in a {side}px square"


def test_corpus_shards_and_manifest(corpus: tuple[Path, dict]) -> None:
    root, manifest = corpus
    assert json.loads((root / "manifest.json").read_text()) == manifest
    assert manifest["name"] == "synthetic" and manifest["colors"] == list(COLORS)
    assert manifest["shapes"] == list(SHAPES) and manifest["directions"] == list(DIRECTIONS)
    assert not list(root.rglob("*.partial"))
    all_keys = []
    for split, count in (("train", NUM_TRAIN), ("val", NUM_VAL)):
        entry, urls = manifest["splits"][split], shard_urls(root, split)
        assert len(urls) == -(-count // PER_SHARD) and urls == sorted(urls)
        assert entry["num_samples"] == count == sum(entry["shard_sizes"])
        for url, size in zip(urls, entry["shard_sizes"], strict=True):
            samples = read_shard(url)
            assert len(samples) == size
            for key, members in samples.items():
                assert key.startswith(split) and "." not in key and "/" not in key
                assert set(members) == {"mp4", "json"}
                meta = json.loads(members["json"].decode("utf-8"))
                assert parse_caption(meta["caption"]) == (meta["color"], meta["shape"], meta["direction"])
                assert (meta["height"], meta["width"]) in FRAME_SIZES and 8 <= meta["num_frames"] <= 12
            all_keys += samples
    assert len(all_keys) == len(set(all_keys)) == NUM_TRAIN + NUM_VAL


def split_combinations(root: Path, split: str) -> list[tuple[str, str, str]]:
    """(color, shape, direction) of every sample of `split`, read from the shards' captions."""
    return [
        parse_caption(json.loads(members["json"])["caption"])
        for url in shard_urls(root, split)
        for members in read_shard(url).values()
    ]


def test_held_out_combinations_are_new_triples_of_trained_pairs() -> None:
    held_out, trained = set(HELD_OUT_COMBINATIONS), set(TRAINING_COMBINATIONS)
    assert len(held_out) == 18 and len(trained) == 54 and held_out | trained == set(COMBINATIONS)
    for first, second in ((0, 1), (0, 2), (1, 2)):  # colour-shape, colour-direction, shape-direction
        pairs = {(c[first], c[second]) for c in trained}
        assert all((c[first], c[second]) in pairs for c in held_out), "a held-out pair was never trained"
    assert {c[2] for c in held_out} == set(DIRECTIONS)


def test_val_shows_only_combinations_no_training_clip_shows(corpus: tuple[Path, dict]) -> None:
    root, manifest = corpus
    val, train = split_combinations(root, "val"), split_combinations(root, "train")
    assert val == list(HELD_OUT_COMBINATIONS) * (NUM_VAL // len(HELD_OUT_COMBINATIONS))
    assert set(train) <= set(TRAINING_COMBINATIONS)
    assert manifest["version"] == CORPUS_VERSION
    assert manifest["held_out_captions"] == [caption_for(*c) for c in HELD_OUT_COMBINATIONS]


def test_ensure_corpus_rewrites_an_older_corpus_and_leaves_other_data_alone(tmp_path: Path) -> None:
    old = tmp_path / "old"
    generate_corpus(old, num_train=2, num_val=1, samples_per_shard=1, min_frames=2, max_frames=2)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["version"]  # as written before held-out combinations
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert ensure_corpus(old / "train")
    rewritten = json.loads((old / "manifest.json").read_text())
    assert rewritten["version"] == CORPUS_VERSION and rewritten["splits"]["train"]["num_samples"] == 2048
    assert set(split_combinations(old, "val")) == set(HELD_OUT_COMBINATIONS)
    assert set(split_combinations(old, "train")) == set(TRAINING_COMBINATIONS)  # 2,048 clips, none held out
    assert not ensure_corpus(old / "train"), "a current corpus is left alone"
    own = tmp_path / "own"
    (own / "train").mkdir(parents=True)
    (own / "manifest.json").write_text(json.dumps({"name": "mine", "splits": {}}))
    assert not ensure_corpus(own / "train") and not any((own / "train").iterdir())


def test_corpus_reads_back_through_webdataset(corpus: tuple[Path, dict]) -> None:
    root, _ = corpus
    dataset = wds.WebDataset(shard_urls(root, "train"), shardshuffle=False).decode()
    count = 0
    for sample in dataset:
        frames, fps = read_video(sample["mp4"])
        meta = sample["json"]
        assert frames.shape == (meta["num_frames"], meta["height"], meta["width"], 3)
        assert fps == pytest.approx(meta["fps"])
        assert measure_clip(frames) == (meta["color"], meta["direction"])
        count += 1
    assert count == NUM_TRAIN


def test_generation_is_deterministic(tmp_path: Path) -> None:
    def files(root: Path, seed: int) -> dict[str, bytes]:
        generate_corpus(
            root, num_train=6, num_val=3, seed=seed, samples_per_shard=4, min_frames=4, max_frames=6
        )
        return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*.tar"))}

    first, again, other = files(tmp_path / "a", 7), files(tmp_path / "b", 7), files(tmp_path / "c", 8)
    assert list(first) == ["train/shard-000000.tar", "train/shard-000001.tar", "val/shard-000000.tar"]
    assert first == again
    assert all(first[name] != other[name] for name in first)


def test_regenerating_removes_stale_shards(tmp_path: Path) -> None:
    generate_corpus(tmp_path, num_train=3, num_val=1, samples_per_shard=1, min_frames=2, max_frames=2)
    generate_corpus(tmp_path, num_train=1, num_val=1, samples_per_shard=1, min_frames=2, max_frames=2)
    assert sorted(path.name for path in (tmp_path / "train").iterdir()) == [
        "shard-000000.idx",
        "shard-000000.tar",
    ]


def test_generate_corpus_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_train"):
        generate_corpus(tmp_path, num_train=0)
    with pytest.raises(ValueError, match="min_frames"):
        generate_corpus(tmp_path, min_frames=10, max_frames=9)


def test_measure_clip_on_clean_renders() -> None:
    clips, captions = random_clips(seed=1)
    assert score_clips(clips, captions) == {"color_acc": 1.0, "motion_acc": 1.0, "num_clips": 72}


def test_measure_clip_on_noisy_blurry_low_res_clips() -> None:
    rng = np.random.default_rng(2)
    clips, captions = random_clips(seed=3)
    scores = score_clips([as_trainer_sees(clip, rng) for clip in clips], captions)
    assert scores["color_acc"] >= 0.9 and scores["motion_acc"] >= 0.9, scores


def test_score_clips_fails_wrong_captions() -> None:
    clips, captions = random_clips(seed=4)
    wrong = []
    for caption in captions:
        color, shape, direction = parse_caption(caption)
        other_color = list(COLORS)[(list(COLORS).index(color) + 1) % len(COLORS)]
        other_direction = DIRECTIONS[(DIRECTIONS.index(direction) + 2) % len(DIRECTIONS)]
        wrong.append(caption_for(other_color, shape, other_direction))
    scores = score_clips(clips, wrong)
    assert scores["color_acc"] == 0.0 and scores["motion_acc"] == 0.0


def test_measure_clip_without_object_or_motion() -> None:
    rng = np.random.default_rng(5)
    noise = np.clip(rng.normal(0.0, 20.0, (12, 32, 32, 3)), 0, 255).astype(np.uint8)
    assert measure_clip(np.zeros((12, 32, 32, 3), np.uint8)) == (None, None)
    assert measure_clip(noise) == (None, None)
    still = np.repeat(render_clip("green", "square", "up", 64, 64, 1, rng), 12, axis=0)
    assert measure_clip(still) == ("green", None)
    assert score_clips([noise], [caption_for("red", "circle", "up")])["color_acc"] == 0.0


def test_score_clips_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError, match="captions"):
        score_clips([np.zeros((2, 8, 8, 3), np.uint8)], [])


def test_cli_writes_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "corpus"
    argv = ["synthetic", "--out", str(out), "--num-train", "5", "--num-val", "2", "--samples-per-shard", "2"]
    assert cli.main([*argv, "--seed", "3", "--fps", "6", "--min-frames", "4", "--max-frames", "5"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "train 5 clips in 3 shards" in printed[0] and str(out) in printed[0]
    assert len(shard_urls(out, "train")) == 3 and len(shard_urls(out, "val")) == 1
    assert json.loads((out / "manifest.json").read_text())["fps"] == 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["synthetic", "--out", "{tmp}", "--num-train", "0"], "num_train"),
        (["synthetic", "--out", "{tmp}", "--num-val", "many"], "--num-val"),
        (["synthetic"], "--out"),
        (["frobnicate"], "frobnicate"),
        ([], "COMMAND"),
    ],
)
def test_cli_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert cli.main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and message in errors[0] and errors[0].startswith("sora-prep")
    assert captured.out == ""
