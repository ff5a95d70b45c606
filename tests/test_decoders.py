"""decord, torchcodec and PyAV behind one interface: the same frames, the same counts, the same skips.

Each test runs on every decoder that loads here and is skipped, with the reason, for the others.
PyAV (a hard dependency) decodes frame by frame from the start, so its frames are the reference:
frame i of a file is the i-th frame a player shows.
"""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sora_train.data_prep.encode import EncodeOptions, encode_shards
from sora_train.data_prep.probe import probe_video

from sora_train.data import decode
from sora_train.data.buckets import Bucket, BucketTable
from sora_train.data.decode import (
    AUTO_ORDER,
    ClipSpec,
    DecoderUnavailable,
    SkipSample,
    choose_indices,
    decode_frames,
    decode_video,
    decoder_problem,
    open_video,
    resolve_decoder,
)
from sora_train.data.loader import LoaderSettings, VideoLoader
from sora_train.data.supervised import WorkerFailure, supervised_map

from .test_loader import write_tar
from .video_files import damaged, decode_outcome, write_timed_video, write_video

# All three decoders convert YUV to RGB with FFmpeg's swscale (BT.601 matrix, the same chroma
# upsampling). Measured on these files with decord 0.6 (its own FFmpeg 4), PyAV 18 (its own
# FFmpeg 7) and torchcodec 0.13 (the system's FFmpeg 5.1), and on textured 256x256 to 640x360
# clips, the frames are bit-identical. Another FFmpeg build may take another SIMD path that
# rounds a level or two apart: 3 levels (about 1 %) allows that, and still tells neighbouring
# frames apart (the test videos' frames differ by 3 to 7 levels in every pixel).
MAX_LEVELS = 3
MEAN_LEVELS = 0.5


def usable(name: str) -> pytest.param:
    """A test parameter for decoder `name`, skipped with the reason where it does not load."""
    problem = decoder_problem(name)
    return pytest.param(
        name, id=name, marks=pytest.mark.skipif(problem is not None, reason=f"{name} cannot load: {problem}")
    )


DECODERS = [usable(name) for name in AUTO_ORDER]
EDIT_LIST_HIDDEN = 3  # frames before time 0 in the edit-list video


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files every decoder must read alike, 12 frames each (9 shown for the edit list)."""
    root = tmp_path_factory.mktemp("videos")
    return {
        "plain": write_video(root / "plain.mp4", 12, 32, 64),
        "rotated": write_video(root / "rotated.mp4", 12, 32, 64, rotation=90),
        "narrow": write_video(root / "narrow.mp4", 12, 32, 48),  # decord fails on 48 wide: PyAV takes over
        "with_audio": write_video(root / "with_audio.mp4", 12, 32, 64, audio=True),
        "matroska": write_video(root / "matroska.mkv", 12, 32, 64, container_format="matroska"),
        "variable_rate": write_timed_video(root / "vfr.mp4", [0, 1, 3, 6, 7, 9, 12, 13, 15, 18, 19, 21]),
        # the header counts 12 frames; an edit list hides the first 3
        "edit_list": write_timed_video(
            root / "edit.mp4", list(range(-EDIT_LIST_HIDDEN, 12 - EDIT_LIST_HIDDEN))
        ),
    }


@pytest.fixture(scope="module")
def reference(videos: dict[str, Path]) -> dict[str, np.ndarray]:
    """Every shown frame of each file, decoded by PyAV: (F, H, W, 3)."""
    return {name: decode_video(path.read_bytes(), "pyav")[0] for name, path in videos.items()}


def frame_numbers(frames: np.ndarray, shown: np.ndarray) -> list[int]:
    """Which shown frame each decoded frame is: the closest by mean absolute difference."""
    distance = np.abs(frames[:, None].astype(np.int16) - shown[None].astype(np.int16)).mean(axis=(2, 3, 4))
    return distance.argmin(axis=1).tolist()


def assert_near(frames: np.ndarray, expected: np.ndarray) -> None:
    """Pixels within the colour-conversion tolerance."""
    assert frames.shape == expected.shape and frames.dtype == np.uint8
    difference = np.abs(frames.astype(np.int16) - expected.astype(np.int16))
    assert difference.max() <= MAX_LEVELS and difference.mean() <= MEAN_LEVELS


@pytest.mark.parametrize("decoder", DECODERS)
def test_frame_counts_agree_with_the_probe(decoder, videos, reference):
    """A decoder's count is the probe's, even where the header counts frames an edit list hides;
    a clip of exactly that many frames decodes, one frame more is too short."""
    for name, path in videos.items():
        data, probed = path.read_bytes(), probe_video(str(path)).num_frames
        assert probed == len(reference[name]) == (12 - EDIT_LIST_HIDDEN if name == "edit_list" else 12)
        with open_video(data, decoder) as video:
            assert video.num_frames == probed, name
        whole = ClipSpec(probed, 1, 16, 16, "center")
        frames = decode_frames(data, whole, np.random.default_rng(0), decoder=decoder)
        assert frame_numbers(frames, reference[name]) == list(range(probed)), name
        assert_near(frames, reference[name])
        for known in (None, probed):
            with pytest.raises(SkipSample) as info:
                decode_frames(
                    data, ClipSpec(probed + 1, 1, 16, 16), np.random.default_rng(0), None, known, decoder
                )
            assert info.value.reason == "too_short"


CLIPS = [  # (spec, frame window, known frame count)
    (ClipSpec(4, 2, 16, 16), None, None),
    (ClipSpec(3, 3, 16, 16, "center"), None, None),
    (ClipSpec(3, 1, 16, 16), (2, 8), None),
    (ClipSpec(2, 2, 16, 16), None, 6),  # the metadata knows fewer frames than the file has
]


@pytest.mark.parametrize("decoder", DECODERS)
def test_every_decoder_picks_the_same_frames(decoder, videos, reference):
    """For the same clip spec and generator, the frame indices of `choose_indices`, near-identical pixels,
    and the generator left in the same state."""
    for name, path in videos.items():
        shown = reference[name]
        for seed, (spec, window, known) in enumerate(CLIPS):
            rng, expected_rng = np.random.default_rng(seed), np.random.default_rng(seed)
            frames = decode_frames(path.read_bytes(), spec, rng, window, known, decoder)
            count = len(shown) if known is None else min(len(shown), known)
            expected = choose_indices(count, spec, expected_rng, window).tolist()
            assert frame_numbers(frames, shown) == expected, (name, spec)
            assert_near(frames, shown[expected])
            assert rng.random() == expected_rng.random()


def video_meta(path: Path, caption: str) -> bytes:
    """The metadata `sora-prep shards` records for a file: the probe's count, rate and upright size."""
    probe = probe_video(str(path))
    width, height = probe.display_size
    return json.dumps(
        {
            "caption": caption,
            "num_frames": probe.num_frames,
            "fps": probe.fps,
            "width": width,
            "height": height,
        }
    ).encode()


def loaded_clips(shard: Path, decoder: str) -> dict[str, np.ndarray]:
    """Every clip of one epoch, by key, as the loader delivers them with `decoder` (in this process)."""
    table = BucketTable((Bucket(4, 16, 16),), stride=2)
    loader = VideoLoader(
        [[str(shard)]], LoaderSettings(table, (2,), seed=5, shuffle_window=4, decoder=decoder)
    )
    clips: dict[str, np.ndarray] = {}
    iterator = iter(loader)
    for batch in iterator:
        if batch["epoch"] != 0:
            break
        clips.update(zip(batch["key"], batch["x"].numpy(), strict=True))
    iterator.close()
    assert loader.skip_counts() == {}
    return clips


@pytest.mark.parametrize("decoder", DECODERS)
def test_the_loader_delivers_the_same_clips_with_every_decoder(decoder, videos, tmp_path):
    members = {}
    for name, path in videos.items():
        members[f"{name}.{path.suffix[1:]}"] = path.read_bytes()
        members[f"{name}.json"] = video_meta(path, f"a {name} video")
    shard = tmp_path / "shard.tar"
    write_tar(shard, members)
    clips, expected = loaded_clips(shard, decoder), loaded_clips(shard, "pyav")
    assert sorted(clips) == sorted(expected) == sorted(videos)
    for key, clip in clips.items():
        assert clip.shape == (3, 4, 16, 16) and clip.max() > 100  # real frames
        assert_near(clip, expected[key])


def test_the_decode_workers_get_the_decoder_resolved_at_start(monkeypatch, videos, tmp_path):
    """Workers are spawned: they decode with the decoder the loader resolved, not their own `auto`."""
    monkeypatch.setattr(decode, "decoder_problem", lambda name: None if name == "pyav" else "not here")
    handed = []

    def run_here(work, tasks, *args, **kwargs):
        handed.append(pickle.loads(pickle.dumps(work)))  # what a spawned worker receives
        return ((task, work(task)) for task in tasks)

    monkeypatch.setattr("sora_train.data.loader.supervised_map", run_here)
    path = videos["plain"]
    write_tar(tmp_path / "one.tar", {"a.mp4": path.read_bytes(), "a.json": video_meta(path, "a video")})
    table = BucketTable((Bucket(4, 16, 16),), stride=2)
    loader = VideoLoader([[str(tmp_path / "one.tar")]], LoaderSettings(table, (1,), num_workers=1))
    batch = next(iter(loader))
    assert loader.decoder == "pyav" and handed[0].args[0].decoder == "pyav"
    assert batch["x"].shape == (1, 3, 4, 16, 16)


FUZZ_SEEDS = range(12)  # even: cut at a random point, odd: 8 random bytes flipped


@pytest.fixture(scope="module")
def damaged_files(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """A 16-frame mp4 with a sound track, damaged once per seed."""
    good = write_video(tmp_path_factory.mktemp("fuzz") / "good.mp4", 16, 32, 64, audio=True).read_bytes()
    return [damaged(good, seed) for seed in FUZZ_SEEDS]


def fuzz_outcomes(decoder: str, files: list[bytes]) -> list[tuple[str, str]]:
    """`decode_outcome` of each file. decord decodes in a supervised worker process, as in the loader:
    it can crash its process on a damaged file, which the loader counts as a `decoder_crash` skip."""
    items = [(decoder, data) for data in files]
    if decoder != "decord":
        return [decode_outcome(item) for item in items]
    results = supervised_map(decode_outcome, items, workers=1, timeout=60.0)
    return [("worker_failure", out.reason) if isinstance(out, WorkerFailure) else out for _, out in results]


@pytest.mark.parametrize("decoder", DECODERS)
def test_damaged_files_are_skipped_with_a_reason(decoder, damaged_files):
    outcomes = fuzz_outcomes(decoder, damaged_files)
    kinds = Counter(kind for kind, _ in outcomes)
    assert len(outcomes) == len(FUZZ_SEEDS) and kinds["raised"] == 0, outcomes
    assert kinds["skipped"] > 0  # most damage is found
    for kind, detail in outcomes:
        if kind == "skipped":
            assert detail in ("decode_error", "too_short")
        elif kind == "frames":
            assert detail == "(4, 32, 64, 3) uint8 0 blank"  # damaged pixels maybe, never zero-filled
        else:  # decord segfaults on some damaged sample tables; torchcodec and PyAV must not
            assert decoder == "decord" and detail == "decoder_crash", outcomes


def availability(missing: set[str]):
    """A stand-in for `decoder_problem` with the decoders in `missing` absent."""
    return lambda name: f"ModuleNotFoundError: No module named {name!r}" if name in missing else None


@pytest.mark.parametrize(
    ("missing", "picked"),
    [
        (set(), "decord"),
        ({"decord"}, "torchcodec"),
        ({"decord", "torchcodec"}, "pyav"),
        ({"torchcodec"}, "decord"),
    ],
)
def test_auto_takes_decord_then_torchcodec_then_pyav(monkeypatch, missing, picked):
    monkeypatch.setattr(decode, "decoder_problem", availability(missing))
    assert resolve_decoder("auto") == picked
    assert resolve_decoder("pyav") == "pyav"


def test_an_unusable_decoder_is_one_clear_error_at_start(monkeypatch, tmp_path, videos):
    monkeypatch.setattr(decode, "decoder_problem", availability({"decord", "torchcodec", "pyav"}))
    with pytest.raises(DecoderUnavailable, match=r"data.decoder=auto: no video decoder loads here"):
        resolve_decoder("auto")
    monkeypatch.setattr(decode, "decoder_problem", availability({"torchcodec"}))
    message = (
        r"data.decoder=torchcodec: torchcodec cannot be used here \(ModuleNotFoundError.*sora-train\[video\]"
    )
    with pytest.raises(DecoderUnavailable, match=message):
        resolve_decoder("torchcodec")
    path = videos["plain"]
    write_tar(tmp_path / "one.tar", {"a.mp4": path.read_bytes(), "a.json": video_meta(path, "a video")})
    table = BucketTable((Bucket(4, 16, 16),), stride=2)
    with pytest.raises(DecoderUnavailable, match=message):  # when the loader is built, before any sample
        VideoLoader([[str(tmp_path / "one.tar")]], LoaderSettings(table, (1,), decoder="torchcodec"))
    with pytest.raises(DecoderUnavailable, match=r"--decoder=torchcodec: torchcodec cannot be used here"):
        encode_shards(EncodeOptions(str(tmp_path / "one.tar"), tmp_path / "latents", decoder="torchcodec"))
    assert not (tmp_path / "latents").exists()
