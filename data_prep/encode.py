"""`sora-prep encode`: video shards -> latent shards, so training never decodes video.

Each input shard becomes an output shard of the same name. Every sample is assigned its bucket
by the trainer's rule (`sora_train.data.buckets`), decoded at that bucket (centre window, the
sample's `frame_window` respected), encoded by the latent space, and written as
`KEY.latent.npy` (C, f, h, w) and `KEY.json` (the source metadata plus `bucket`, `latent_shape`,
`latent_space`, `source_key`). With a text encoder, `KEY.text.npy` (T, E) and
`KEY.text_mask.npy` (T,) hold the caption's embedding; without one the caption stays text for
the trainer's own encoder. Samples that cannot be used are counted by reason in the shard's
`.index.json`, never written half-way. `decoder` picks the video decoder as the trainer's
`data.decoder` does; every decoder returns the same frames.

Under `torchrun`, rank r takes input shards r, r + world, ...; a shard whose output and index
exist is skipped, so rerunning after an interruption finishes the rest. Rank 0 writes
`manifest.json` once every rank is done.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sora_train.data.buckets import BucketTable, load_bucket_table
from sora_train.data.decode import ClipSpec, DecoderName, SkipSample, decode_clip, resolve_decoder
from sora_train.data.metadata import video_fields
from sora_train.data.shard_writer import ShardFile, index_path, write_json_atomic
from sora_train.data.shards import iter_shard, read_captioned
from sora_train.data.storage import resolve_shards
from sora_train.parallel.dist import shutdown_distributed

STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class EncodeOptions:
    """What `sora-prep encode` reads, writes and encodes with."""

    src: str
    out: Path
    buckets: str = "video_256"
    latent_space: str = "pixel"
    vae_path: str | None = None
    text_encoder: str = "none"  # none | t5 | umt5
    text_encoder_path: str | None = None
    text_max_length: int = 128
    device: str = "cpu"
    dtype: str = "float32"  # the encoders' compute dtype: float32 | bfloat16
    storage_dtype: str = "float16"
    decoder: DecoderName = "auto"  # as the trainer's data.decoder: auto | decord | torchcodec | pyav


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as the bytes of a .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


class Encoders:
    """The latent space and (optional) text encoder of one run, loaded once."""

    def __init__(self, options: EncodeOptions):
        from sora_train.models.vae import build_latent_space

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[options.dtype]
        self.latent_space = build_latent_space(options.latent_space, options.vae_path, options.device, dtype)
        self.text = None
        if options.text_encoder != "none":
            from sora_train.models.text_encoders import build_text_encoder

            if not options.text_encoder_path:
                raise ValueError(f"--text-encoder {options.text_encoder} needs --text-encoder-path")
            self.text = build_text_encoder(
                options.text_encoder,
                options.text_encoder_path,
                options.text_max_length,
                options.device,
                dtype,
            )
        self.device = options.device


def encode_sample(
    sample: dict, table: BucketTable, encoders: Encoders, options: EncodeOptions
) -> tuple[dict, str]:
    """One video sample -> (latent sample, bucket name); raises SkipSample with the reason."""
    meta, caption = read_captioned(sample)
    if "mp4" not in sample:
        raise SkipSample("missing_video")
    fields = video_fields(meta)  # raises SkipSample("bad_metadata") for a malformed field
    width, height, frames = fields.width, fields.height, fields.clip_frames
    if width is None or height is None or frames is None:
        raise SkipSample("bad_metadata", "the json lacks width, height or num_frames")
    bucket = table.assign(width, height, frames)
    if bucket is None:
        raise SkipSample("no_bucket", f"{frames} frames at {width}x{height}")
    spec = ClipSpec(bucket.frames, table.stride, bucket.height, bucket.width, window="center")
    pixels = decode_clip(
        sample["mp4"], spec, np.random.default_rng(0), fields.window, fields.num_frames, options.decoder
    )
    with torch.no_grad():
        latent = encoders.latent_space.encode(pixels[None].to(encoders.device))[0]  # (C, f, h, w)
    storage = STORAGE_DTYPES[options.storage_dtype]
    out = {
        "__key__": sample["__key__"],
        "latent.npy": npy_bytes(latent.float().cpu().numpy().astype(storage)),
    }
    if encoders.text is not None:
        embedding, mask = encoders.text([caption])  # (1, T, E), (1, T)
        out["text.npy"] = npy_bytes(embedding[0].numpy().astype(storage))
        out["text_mask.npy"] = npy_bytes(mask[0].numpy())
    meta = {
        **meta,
        "bucket": bucket.name,
        "latent_shape": list(latent.shape),
        "latent_space": options.latent_space,
        "text_encoder": options.text_encoder,
        "source_key": sample["__key__"],
    }
    meta.pop("frame_window", None)  # the latent holds exactly the clip
    meta["num_frames"] = frames
    out["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return out, bucket.name


def encode_shard(
    source: str, target: Path, table: BucketTable, encoders: Encoders, options: EncodeOptions
) -> dict:
    """Encode one video shard into `target` (atomically) and write its index; returns the index."""
    shard = ShardFile(target)
    skipped: Counter = Counter()
    buckets: Counter = Counter()
    samples = iter_shard(source)
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except Exception:  # a truncated or corrupt input tar: keep what was read, count it
            skipped["corrupt_shard"] += 1
            break
        try:
            out, bucket = encode_sample(sample, table, encoders, options)
        except SkipSample as skip:
            skipped[skip.reason] += 1
            continue
        shard.add(out)
        buckets[bucket] += 1
    shard.commit()
    index = {
        "samples": shard.samples,
        "bytes": shard.bytes,
        "skipped": dict(skipped),
        "buckets": dict(buckets),
    }
    write_json_atomic(index_path(target), index)
    return index


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def encode_shards(options: EncodeOptions) -> dict | None:
    """Encode this rank's shards (skipping done ones); rank 0 returns the manifest once all ranks finish."""
    inputs = resolve_shards(options.src)
    table = load_bucket_table(options.buckets)
    resolve_decoder(options.decoder, option="--decoder")  # one clear error now, not a skip per sample
    rank, world = _rank_world()
    options.out.mkdir(parents=True, exist_ok=True)
    names = [Path(path).name for path in inputs]
    if len(set(names)) != len(names):
        raise ValueError(f"{options.src}: shard file names repeat; encode one split at a time")
    encoders = Encoders(options)
    for bucket in table.buckets:  # a table the latent space cannot encode fails here, not mid-corpus
        encoders.latent_space.latent_shape(bucket.frames, bucket.height, bucket.width)
    for source in inputs[rank::world]:
        target = options.out / Path(source).name
        if not (target.is_file() and index_path(target).is_file()):
            encode_shard(source, target, table, encoders, options)
    if world > 1:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo")
        shutdown_distributed()  # waits for every rank's shards, then leaves the group cleanly
    if rank != 0:
        return None
    manifest = summarize(options, names, table)
    write_json_atomic(options.out / "manifest.json", manifest)
    return manifest


def summarize(options: EncodeOptions, names: list[str], table: BucketTable) -> dict:
    """The manifest of an encoded directory, from its shard indexes."""
    skipped: Counter = Counter()
    buckets: Counter = Counter()
    shards = []
    for name in names:
        index = json.loads(index_path(options.out / name).read_text(encoding="utf-8"))
        skipped.update(index["skipped"])
        buckets.update(index["buckets"])
        shards.append({"name": name, "samples": index["samples"], "bytes": index["bytes"]})
    return {
        "name": "latents",
        "source": options.src,
        "latent_space": options.latent_space,
        "vae_path": options.vae_path,
        "text_encoder": options.text_encoder,
        "text_encoder_path": options.text_encoder_path,
        "buckets": {
            "table": options.buckets,
            "stride": table.stride,
            "counts": dict(sorted(buckets.items())),
        },
        "num_samples": sum(s["samples"] for s in shards),
        "skipped": dict(sorted(skipped.items())),
        "shards": shards,
    }
