"""`sora-prep encode` and `inspect`, and training on latent shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sora_train.data_prep.cli import main as prep_main

from sora_train.data.buckets import bucket_table_from_dict
from sora_train.data.decode import ClipSpec, decode_clip
from sora_train.data.shards import iter_shard, load_npy
from sora_train.data.storage import resolve_shards
from sora_train.metrics import read_metrics
from sora_train.models.vae import WanVAE
from sora_train.video_io import read_video

from .conftest import FAST, REPO, assert_ok, run_module, run_train
from .tiny_pretrained import save_tiny_t5, save_tiny_wan

PIXEL_TABLE = {"stride": 2, "buckets": [{"frames": 4, "height": 16, "width": 16}]}
# 1 + 4k frames for the causal Wan VAE; landscape and portrait
WAN_TABLE = {
    "stride": 2,
    "buckets": [{"frames": 5, "height": 32, "width": 48}, {"frames": 5, "height": 48, "width": 32}],
}


def write_table(path: Path, table: dict) -> str:
    path.write_text(json.dumps(table))  # JSON is YAML
    path = path.rename(path.with_suffix(".yaml"))
    return str(path)


def samples(directory: Path) -> list[dict]:
    return [s for shard in resolve_shards(str(directory)) for s in iter_shard(shard)]


@pytest.fixture(scope="module")
def pixel_latents(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    table = write_table(tmp_path_factory.mktemp("tables") / "pixel.json", PIXEL_TABLE)
    out = tmp_path_factory.mktemp("pixel_latents")
    assert prep_main(["encode", "--src", str(corpus / "train"), "--out", str(out), "--buckets", table,
                      "--storage-dtype", "float32"]) == 0  # fmt: skip
    return out


def test_identity_encode_holds_exactly_the_clip_the_trainer_would_decode(corpus, pixel_latents):
    videos = {s["__key__"]: s for s in samples(corpus / "train")}
    latents = samples(pixel_latents)
    assert len(latents) == len(videos) == 64
    spec = ClipSpec(num_frames=4, stride=2, height=16, width=16, window="center")
    for sample in latents[:8]:
        meta = json.loads(sample["json"])
        assert meta["bucket"] == "4x16x16" and meta["latent_shape"] == [3, 4, 16, 16]
        clip = decode_clip(videos[meta["source_key"]]["mp4"], spec, np.random.default_rng(0))
        np.testing.assert_array_equal(load_npy(sample["latent.npy"]), clip.numpy())
        assert "text.npy" not in sample and meta["caption"]
    manifest = json.loads((pixel_latents / "manifest.json").read_text())
    assert manifest["num_samples"] == 64 and manifest["skipped"] == {}
    assert manifest["buckets"]["counts"] == {"4x16x16": 64}


def test_encode_resumes_per_shard(corpus, pixel_latents, tmp_path):
    out = tmp_path / "latents"
    out.mkdir()
    for path in pixel_latents.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    (out / "shard-000003.tar").unlink()
    (out / "shard-000005.index.json").unlink()
    untouched = (out / "shard-000000.tar").stat().st_mtime_ns
    table = write_table(tmp_path / "pixel.json", PIXEL_TABLE)
    assert prep_main(["encode", "--src", str(corpus / "train"), "--out", str(out), "--buckets", table,
                      "--storage-dtype", "float32"]) == 0  # fmt: skip
    assert (out / "shard-000000.tar").stat().st_mtime_ns == untouched
    for name in ("shard-000003.tar", "shard-000005.tar"):
        assert (out / name).read_bytes() == (pixel_latents / name).read_bytes()
    resumed, whole = (json.loads((d / "manifest.json").read_text()) for d in (out, pixel_latents))
    assert resumed["num_samples"] == whole["num_samples"] == 64 and resumed["shards"] == whole["shards"]


def test_inspect_reports_counts_and_buckets(pixel_latents, corpus, capsys):
    assert prep_main(["inspect", str(pixel_latents)]) == 0
    report = capsys.readouterr().out
    assert "64 samples, 8 shards" in report and "bucket 4x16x16: 64" in report
    assert (
        prep_main(
            ["inspect", str(corpus / "train"), "--buckets", str(REPO / "configs/buckets/video_256.yaml")]
        )
        == 0
    )
    assert "64 samples" in capsys.readouterr().out


@pytest.fixture(scope="module")
def wan_latents(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """Val clips encoded with a tiny random Wan VAE and UMT5 encoder: (latent dir, VAE dir, UMT5 dir)."""
    root = tmp_path_factory.mktemp("pretrained")
    wan_dir = save_tiny_wan(root / "wan")
    save_tiny_t5("umt5", root / "umt5")
    table = write_table(root / "wan_table.json", WAN_TABLE)
    out = tmp_path_factory.mktemp("wan_latents")
    shard = resolve_shards(str(corpus / "val"))[0]
    assert prep_main(["encode", "--src", shard, "--out", str(out), "--buckets", table, "--latent-space", "wan",
                      "--vae", wan_dir, "--text-encoder", "umt5", "--text-encoder-path", str(root / "umt5"),
                      "--text-max-length", "8", "--device", "cpu"]) == 0  # fmt: skip
    return out, wan_dir, str(root / "umt5")


def test_wan_and_t5_encode_by_bucket_and_decode_back(wan_latents):
    out, wan_dir, _ = wan_latents
    vae = WanVAE(wan_dir)
    table_obj = bucket_table_from_dict(WAN_TABLE)
    encoded = samples(out)
    assert len(encoded) == 8
    for sample in encoded:
        meta = json.loads(sample["json"])
        bucket = table_obj.assign(meta["width"], meta["height"], meta["num_frames"])
        assert meta["bucket"] == bucket.name
        latent = load_npy(sample["latent.npy"])
        assert latent.dtype == np.float16 and list(latent.shape) == meta["latent_shape"]
        assert latent.shape == vae.latent_shape(bucket.frames, bucket.height, bucket.width)
        text, mask = load_npy(sample["text.npy"]), load_npy(sample["text_mask.npy"])
        assert text.shape == (8, 32) and mask.dtype == bool and mask.any()
        assert not text[~mask].any()  # padding is zero
        pixels = vae.decode(torch.from_numpy(latent.astype(np.float32))[None])
        assert pixels.shape == (1, 3, bucket.frames, bucket.height, bucket.width)
        assert pixels.abs().max() <= 1
    assert {json.loads(s["json"])["bucket"] for s in encoded} == {"5x32x48", "5x48x32"}


def test_trainer_runs_on_latent_shards(pixel_latents, tmp_path):
    run = tmp_path / "run"
    result = run_train(f"run_dir={run}", "data=latents", f"data.train={pixel_latents}", *FAST,
                       "data.num_workers=1", "train.max_steps=3", "train.global_batch_size=4",
                       "train.sample_every=0", "checkpoint.every=0")  # fmt: skip
    assert_ok(result)
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)


def test_trainer_runs_on_wan_latents_with_precomputed_umt5_text(wan_latents, tmp_path):
    out, wan_dir, umt5_dir = wan_latents
    run = tmp_path / "run"
    result = run_train(f"run_dir={run}", "data=latents", f"data.train={out}", *FAST, "model.patch_size=[1,4,4]",
                       "data.num_frames=5", "data.height=32", "data.width=48", "data.num_workers=0",
                       "model.latent_space=wan", f"model.vae_path={wan_dir}", "model.text_encoder=umt5",
                       f"model.text_encoder_path={umt5_dir}", "data.caption_dropout=0.5", "train.max_steps=2",
                       "train.global_batch_size=2", "checkpoint.every=0",
                       "train.sample_prompts=[a red ball]")  # fmt: skip
    assert_ok(result)
    rows = read_metrics(run)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    skips = [r["skipped_by_reason"] for r in rows if r.get("event") == "data"]
    assert skips and set(skips[-1]) <= {"wrong_bucket"}  # portrait clips are another bucket, counted
    videos = list((run / "samples").rglob("*.mp4"))
    assert videos, "sampling decodes through the VAE with UMT5 prompt embeddings"
    frames, _ = read_video(videos[0])
    assert frames.shape == (5, 32, 48, 3)


def test_trainer_encodes_pixels_in_loop_with_frozen_wan_and_umt5_in_bf16(corpus, wan_latents, tmp_path):
    """Training from pixel shards: the VAE and the text encoder run in the loop, frozen, in bf16."""
    _, wan_dir, umt5_dir = wan_latents
    run = tmp_path / "run"
    result = run_train(f"run_dir={run}", "data=shards", f"data.train={corpus / 'train'}", *FAST,
                       "model.patch_size=[1,4,4]", "data.num_frames=5", "data.height=32", "data.width=48",
                       "data.num_workers=0", "model.latent_space=wan", f"model.vae_path={wan_dir}",
                       "model.text_encoder=umt5", f"model.text_encoder_path={umt5_dir}", "model.text_max_length=8",
                       "train.precision=bf16", "train.max_steps=2", "train.global_batch_size=2",
                       "checkpoint.every=0", "checkpoint.save_final=false", "eval.validate=false",
                       "train.sample_prompts=[]")  # fmt: skip
    assert_ok(result)
    rows = read_metrics(run)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    (frozen,) = [r for r in rows if r.get("event") == "frozen_encoders"]
    for name in ("vae", "text_encoder"):
        assert frozen[name]["trainable"] == 0 and frozen[name]["parameters"] > 0, name
        assert frozen[name]["dtype"] == "bfloat16" and not frozen[name]["training_mode"], name


def test_encode_under_torchrun_splits_shards_over_ranks(corpus, tmp_path):
    table = write_table(tmp_path / "pixel.json", PIXEL_TABLE)
    out = tmp_path / "latents"
    result = run_module("torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "sora_train.data_prep.cli", "encode", "--src", str(corpus / "train"), "--out", str(out),
                        "--buckets", table, "--device", "cpu")  # fmt: skip
    assert_ok(result)
    assert result.stdout.count("sora-prep encode: 64 samples in 8 shards") == 1  # rank 0 reports
    assert len(samples(out)) == 64
