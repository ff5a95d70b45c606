"""The compact sample index beside each shard: the loader reads it instead of scanning, plans exactly
what a scan would give, and never trusts one that is damaged, foreign or made for other bytes."""

from __future__ import annotations

import io
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sora_train.data_prep.cli import main as prep_main

from sora_train.data import index
from sora_train.data.loader import LoaderSettings, VideoLoader
from sora_train.data.sample_index import (
    SampleIndexInvalid,
    read_sample_index,
    side_index_path,
    write_sample_index,
)
from sora_train.data.storage import resolve_shards

from .test_loader import TABLE


def loader_for(source: str, cache: Path) -> VideoLoader:
    return VideoLoader(
        [resolve_shards(source)], LoaderSettings(TABLE, (3,), seed=7, shuffle_window=8, cache_dir=cache)
    )


def first_batches(loader: VideoLoader, count: int = 12) -> list[list[int]]:
    return [loader.planned(j).samples.tolist() for j in range(count)]


def without_indexes(shards: Path, target: Path) -> Path:
    """A copy of a directory of shards without their indexes."""
    shutil.copytree(shards, target, ignore=shutil.ignore_patterns("*.idx"))
    return target


def forbid_scans(monkeypatch) -> None:
    def scan(location: str) -> dict:
        raise AssertionError(f"{location} was scanned")

    monkeypatch.setattr(index, "scan_shard", scan)


@pytest.fixture
def scanned(corpus, tmp_path) -> VideoLoader:
    """The loader over the corpus' shards as a scan of every tar sees them."""
    return loader_for(str(without_indexes(corpus / "train", tmp_path / "bare")), tmp_path / "scan-cache")


def test_sora_prep_writes_an_index_beside_every_shard(corpus):
    shards = sorted((corpus / "train").glob("*.tar"))
    assert [Path(side_index_path(str(s))).is_file() for s in shards] == [True] * len(shards)
    sizes = [len(read_sample_index(side_index_path(str(s)), s.stat().st_size)) for s in shards]
    assert sum(sizes) == 64


def test_the_loader_reads_the_indexes_without_scanning_and_plans_as_a_scan_would(
    corpus, tmp_path, scanned, monkeypatch
):
    forbid_scans(monkeypatch)
    cache = tmp_path / "cache"
    loader = loader_for(str(corpus / "train"), cache)
    assert (loader.plan_id, loader.index_digest) == (scanned.plan_id, scanned.index_digest)
    assert first_batches(loader) == first_batches(scanned)
    assert not list((cache / "index").glob("*.idx"))  # nothing rebuilt; only the probe's markers
    assert len(list((cache / "index").glob("*.verified"))) == 8
    location, start, length = loader.indexes[0].sample_range(int(loader.planned(0).samples[0]))
    with tarfile.open(location) as tar:
        assert any(info.offset == start for info in tar.getmembers())
    assert length % tarfile.BLOCKSIZE == 0


def damage(data: bytes, rng: np.random.Generator, other: bytes) -> bytes:
    """One random kind of damage to an index file's bytes."""
    kind = int(rng.integers(0, 6))
    position = int(rng.integers(0, len(data)))
    if kind == 0:  # a flipped byte anywhere
        return data[:position] + bytes([data[position] ^ int(rng.integers(1, 256))]) + data[position + 1 :]
    if kind == 1:  # cut short
        return data[:position]
    if kind == 2:  # trailing bytes
        return data + rng.bytes(int(rng.integers(1, 100)))
    if kind == 3:  # random bytes over a stretch
        stop = min(len(data), position + int(rng.integers(1, 64)))
        return data[:position] + rng.bytes(stop - position) + data[stop:]
    if kind == 4:  # another shard's index
        return other
    return b""  # empty


@pytest.mark.parametrize("seed", range(24))
def test_a_damaged_or_foreign_index_is_never_trusted(corpus, tmp_path, scanned, seed, capfd):
    """Fuzzed damage to one shard's index: the loader either finds the index sound and exactly what
    a scan gives, or says it does not trust it and scans that shard; the plan is the scan's."""
    rng = np.random.default_rng(seed)
    copy = tmp_path / "copy"
    shutil.copytree(corpus / "train", copy)
    shards = sorted(copy.glob("*.tar"))
    victim, other = (Path(side_index_path(str(shards[(seed + i) % 8]))) for i in (0, 1))
    clean = tmp_path / "clean.idx"
    shutil.copy(victim, clean)
    victim.write_bytes(damage(clean.read_bytes(), rng, other.read_bytes()))
    loader = loader_for(str(copy), tmp_path / "cache")
    assert (loader.plan_id, loader.index_digest) == (scanned.plan_id, scanned.index_digest)
    assert first_batches(loader) == first_batches(scanned)
    warned = f"scanning the shard instead of using its index: {victim}" in capfd.readouterr().err
    try:
        trusted = index.verified_side_index(str(victim.with_suffix(".tar")), str(victim), tmp_path / "check")
    except SampleIndexInvalid:
        assert warned
    else:  # harmless damage (trailing JSON whitespace): the same records
        assert not warned and trusted.records.tobytes() == read_sample_index(clean).records.tobytes()


def rewrite_with_a_leading_member(shard: Path) -> None:
    """The same samples after a small first member: every sample moves, the tar's size does not."""
    size = shard.stat().st_size
    with tarfile.open(shard) as source:
        members = [(info, source.extractfile(info).read()) for info in source.getmembers()]
    with tarfile.open(shard, "w") as rewritten:
        note = tarfile.TarInfo("README.txt")
        note.size = 4
        rewritten.addfile(note, io.BytesIO(b"note"))
        for info, data in members:
            rewritten.addfile(info, io.BytesIO(data))
    assert shard.stat().st_size == size


def test_an_index_made_for_other_bytes_of_the_same_size_is_caught_by_its_probe(corpus, tmp_path, capfd):
    copy = tmp_path / "copy"
    shutil.copytree(corpus / "train", copy)
    shard = sorted(copy.glob("*.tar"))[0]
    rewrite_with_a_leading_member(shard)
    loader = loader_for(str(copy), tmp_path / "cache")
    assert "its shard's bytes changed since the index was made" in capfd.readouterr().err
    reference = loader_for(str(without_indexes(copy, tmp_path / "bare")), tmp_path / "scan-cache")
    assert loader.index_digest == reference.index_digest


def test_sora_prep_index_writes_what_is_missing_or_stale_and_leaves_the_rest(
    corpus, tmp_path, capsys, monkeypatch
):
    bare = without_indexes(corpus / "train", tmp_path / "bare-copy")
    assert prep_main(["index", str(bare), "--workers", "1"]) == 0
    assert "8 shards indexed, 0 already were; 64 usable samples" in capsys.readouterr().out
    assert prep_main(["index", str(bare), "--workers", "2"]) == 0
    assert "0 shards indexed, 8 already were" in capsys.readouterr().out
    rewrite_with_a_leading_member(sorted(bare.glob("*.tar"))[3])
    assert prep_main(["index", str(bare), "--workers", "1"]) == 0
    assert "1 shards indexed, 7 already were" in capsys.readouterr().out
    reference = loader_for(str(without_indexes(bare, tmp_path / "rescanned")), tmp_path / "scan-cache-2")
    forbid_scans(monkeypatch)
    assert loader_for(str(bare), tmp_path / "cache").index_digest == reference.index_digest
    assert prep_main(["index", "memory://store/x.tar"]) == 2


def test_an_object_store_shard_index_is_fetched_once_and_used(corpus, tmp_path, scanned, monkeypatch):
    import fsspec

    memory = fsspec.filesystem("memory")
    for shard in sorted((corpus / "train").glob("*.tar")):
        for path in (shard, Path(side_index_path(str(shard)))):
            memory.pipe(f"/indexed/train/{path.name}", path.read_bytes())
    forbid_scans(monkeypatch)
    cache = tmp_path / "cache"
    loader = loader_for("memory://indexed/train", cache)
    assert loader.index_digest == scanned.index_digest
    assert first_batches(loader) == first_batches(scanned)
    assert len(list((cache / "index").glob("*.side.idx"))) == 8


@pytest.mark.parametrize("shift", ["all_by_a_block", "last_to_the_end"])
def test_a_well_formed_index_with_wrong_offsets_is_caught(corpus, tmp_path, scanned, shift, capfd):
    """Checksums that agree do not make offsets right: the probe reads the shard where the index
    says samples start."""
    copy = tmp_path / "copy"
    shutil.copytree(corpus / "train", copy)
    shard = sorted(copy.glob("*.tar"))[2]
    side = Path(side_index_path(str(shard)))
    clean = read_sample_index(side)
    records = np.array(clean.records)
    if shift == "all_by_a_block":
        records["start"] += tarfile.BLOCKSIZE
        records["length"] -= tarfile.BLOCKSIZE
    else:
        records["start"][-1], records["length"][-1] = clean.tar_bytes - 100, 100
    write_sample_index(side, replace(clean, records=records))
    loader = loader_for(str(copy), tmp_path / "cache")
    assert f"scanning the shard instead of using its index: {side}" in capfd.readouterr().err
    assert loader.index_digest == scanned.index_digest
