"""Shard sources: `pipe:` commands only ever come from the config string, and only when allowed;
a directory of hostile file names is read as files."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from sora_train.data import index
from sora_train.data.index import build_index
from sora_train.data.storage import PIPE, ShardError, resolve_shards

# File names a directory may hold that would run a shell if they were ever read as pipe: URLs.
HOSTILE_NAMES = [
    "pipe:touch PWNED;.tar",
    "pipe:touch PWNED.tar",
    "pipe:echo {a,b} > PWNED;.tar",
    "pipe: touch PWNED .tar",
]


@pytest.fixture
def hostile_dir(tmp_path: Path, corpus: Path) -> Path:
    """One real shard and a few hostile names (empty files) in one directory."""
    directory = tmp_path / "shards"
    directory.mkdir()
    shutil.copy(resolve_shards(str(corpus / "train"))[0], directory / "good.tar")
    for name in HOSTILE_NAMES:
        (directory / name).write_bytes(b"not a tar")
    return directory


@pytest.mark.parametrize("allow_pipe", [False, True])
def test_a_directory_listing_never_becomes_a_pipe_url(hostile_dir, tmp_path, monkeypatch, allow_pipe):
    for source in (str(hostile_dir), "."):  # "." lists bare names: the listing keeps the "./"
        monkeypatch.chdir(hostile_dir)
        urls = resolve_shards(source, allow_pipe=allow_pipe)
        assert len(urls) == len(HOSTILE_NAMES) + 1
        assert not any(url.startswith(PIPE) for url in urls)
        index = build_index(urls, cache_dir=tmp_path / f"cache-{source != '.'}")
        assert index.corrupt_shards == len(HOSTILE_NAMES)  # read as (broken) files, counted
        assert len(index) == 8  # the good shard's samples
        assert not (hostile_dir / "PWNED").exists() and not (tmp_path / "PWNED").exists()
        assert not any(p.name.startswith("PWNED") for p in Path(os.getcwd()).iterdir())


@pytest.mark.parametrize(
    "source",
    [
        "pipe:cat a.tar",
        "{pipe:cat a.tar,pipe:cat b.tar}",
        "pipe:cat shard-{0..1}.tar",
        "{x.tar,pipe:cat a.tar}",
    ],
)
def test_pipe_commands_in_the_config_string_need_allow_pipe(source):
    with pytest.raises(ShardError, match=r"data\.allow_pipe=true"):
        resolve_shards(source)


def test_allowed_pipe_sources_are_all_commands_or_none():
    assert resolve_shards("pipe:cat shard-{0..1}.tar", allow_pipe=True) == [
        "pipe:cat shard-0.tar",
        "pipe:cat shard-1.tar",
    ]
    with pytest.raises(ShardError, match="all pipe: commands or none"):
        resolve_shards("{x.tar,pipe:cat a.tar}", allow_pipe=True)


class FlakyFile(io.BytesIO):
    """A shard whose first `failures` opened copies fail their reads after 1 KiB, as a throttled
    object store or a network file system in trouble would."""

    failures = 0

    def read(self, size: int = -1) -> bytes:
        if FlakyFile.failures > 0 and self.tell() > 1024:
            FlakyFile.failures -= 1
            raise OSError(5, "Input/output error")
        return super().read(size)


@pytest.mark.parametrize("failures, readable", [(3, True), (4, False)])
def test_a_failed_read_is_retried_and_never_cached_as_a_truncated_shard(
    corpus, tmp_path, monkeypatch, failures, readable
):
    shard = resolve_shards(str(corpus / "train"))[0]
    clean = index.scan_shard(shard)
    monkeypatch.setattr(index, "open_shard", lambda location: FlakyFile(Path(location).read_bytes()))
    monkeypatch.setattr(index, "RETRY_WAIT", 0.0)
    monkeypatch.setattr(index.time, "sleep", lambda seconds: None)
    FlakyFile.failures = failures
    cache = tmp_path / "cache"
    if readable:  # three failed attempts, then the fourth reads it whole
        location, path, scanned = index.cached_scan(shard, cache)
        assert (location, path, scanned.corrupt, clean["corrupt"]) == (
            shard, str(index.scan_cache_path(shard, shard, cache)), None, None
        )  # fmt: skip
        assert len(scanned) == len(clean["samples"]) and scanned.rejected == {}
        assert scanned.records["start"].tolist() == [record["start"] for record in clean["samples"]]
        assert FlakyFile.failures == 0
    else:
        with pytest.raises(ShardError, match=f"{Path(shard).name}: unreadable after 4 attempts"):
            index.cached_scan(shard, cache)
    assert [p for p in (cache / "index").glob("*.idx")] == (
        [index.scan_cache_path(shard, shard, cache)] if readable else []
    )


def test_ranks_that_indexed_the_corpus_differently_stop_before_training(corpus, tmp_path, monkeypatch):
    """The same shard names and sample counts, one shard rewritten with its samples at other byte
    offsets: the plan id cannot tell them apart, the index digest does, and the ranks' check stops."""
    from sora_train import train
    from sora_train.config import ConfigError
    from sora_train.data.loader import LoaderSettings, VideoLoader

    from .test_loader import TABLE

    copy = tmp_path / "copy"
    shutil.copytree(corpus / "train", copy)
    first = sorted(copy.glob("*.tar"))[0]
    with tarfile.open(first) as source:
        members = [(info, source.extractfile(info).read()) for info in source.getmembers()]
    with tarfile.open(first, "w") as rewritten:  # a leading note shifts every sample's bytes
        note = tarfile.TarInfo("README.txt")
        note.size = 4
        rewritten.addfile(note, io.BytesIO(b"note"))
        for info, data in members:
            rewritten.addfile(info, io.BytesIO(data))
    settings = LoaderSettings(TABLE, (3,), seed=7, shuffle_window=8, cache_dir=tmp_path / "cache")
    loaders = [VideoLoader([resolve_shards(str(path))], settings) for path in (corpus / "train", copy)]
    assert loaders[0].plan_id == loaders[1].plan_id
    assert loaders[0].index_digest != loaders[1].index_digest
    seen = [(loader.plan_id, loader.index_digest) for loader in loaders]
    monkeypatch.setattr(train, "all_gather_objects", lambda mine: seen)
    with pytest.raises(ConfigError, match=r"ranks \[1\] differ"):
        train.check_same_data(loaders[0])
    monkeypatch.setattr(train, "all_gather_objects", lambda mine: [seen[0], seen[0]])
    train.check_same_data(loaders[0])  # the same index everywhere: no error


# (field, value, is it bad?): values of the wrong type, not finite, negative, fractional, huge,
# nested, or absent (absent size fields are probed from the container instead: good).
METADATA_FUZZ = [
    *[(f, v, True) for f in ("width", "height") for v in ("x", -5, 0, 1e400, float("nan"), 10**12, True, 3.5, [1], {"a": 1})],
    *[("num_frames", v, True) for v in ("x", float("nan"), -1, 0, 1e400, 2.5, [18])],
    *[("fps", v, True) for v in (float("nan"), -1, "8", 1e400, float("-inf"), [8])],
    *[("frame_window", v, True) for v in (["a", 3], [3, 1], [0], "0,3", [0, 1e400], [-1, 3], [0.5, 3], {"0": 3})],
    ("width", None, False), ("num_frames", None, False), ("fps", None, False),
    ("extra", {"deep": [[[{"x": None}]]]}, False), ("frame_window", [0, 12], False),
]  # fmt: skip


def rewrite_metadata(shard: Path, changes: dict[str, tuple[str, object]], raw: dict[str, bytes]) -> None:
    """Rewrite `shard` with the json of sample `key` changed: `changes[key]` = (field, value), a value
    of None removing the field; `raw[key]` replaces the whole json member."""
    with tarfile.open(shard) as source:
        members = [(info, source.extractfile(info).read()) for info in source.getmembers()]
    with tarfile.open(shard, "w") as rewritten:
        for info, data in members:
            key = info.name.rsplit(".", 1)[0]
            if info.name.endswith(".json") and (key in changes or key in raw):
                meta = json.loads(data)
                if key in changes:
                    field, value = changes[key]
                    meta.pop(field, None)
                    if value is not None:
                        meta[field] = value
                data = (
                    raw.get(key) or json.dumps(meta).encode()
                )  # json.dumps writes NaN / Infinity as JSON5 does
                info.size = len(data)
            rewritten.addfile(info, io.BytesIO(data))


def test_fuzzed_metadata_is_a_counted_bad_metadata_skip_and_the_rest_trains(corpus, tmp_path):
    from sora_train.data.loader import LoaderSettings, VideoLoader
    from sora_train.data.samples import SampleSettings, SampleTask, load_example

    from .test_loader import TABLE, rest_of_epoch

    shards = tmp_path / "shards"
    shutil.copytree(corpus / "train", shards)
    keys = [f"train{i:07d}" for i in range(len(METADATA_FUZZ) + 3)]  # the corpus' first samples
    changes = {
        key: (field, value)
        for key, (field, value, _) in zip(keys[: len(METADATA_FUZZ)], METADATA_FUZZ, strict=True)
    }
    raw = {keys[-3]: b"[1, 2]", keys[-2]: b"[" * 100_000, keys[-1]: b'{"width": 1e999999, "caption": "x"}'}
    for shard in sorted(shards.glob("*.tar")):
        rewrite_metadata(shard, changes, raw)
    bad = {
        key for key, (_, _, is_bad) in zip(keys[: len(METADATA_FUZZ)], METADATA_FUZZ, strict=True) if is_bad
    } | set(raw)
    settings = LoaderSettings(TABLE, (3,), seed=7, shuffle_window=8, cache_dir=tmp_path / "cache")
    loader = VideoLoader([resolve_shards(str(shards))], settings)
    assert loader.rejected["bad_metadata"] == len(bad)
    trained = set(rest_of_epoch(loader))
    assert not trained & bad and len(trained) >= 64 - len(bad) - 3  # a batch may be left over
    assert loader.skipped == {}  # nothing failed at decode time either
    # at decode time too (a shard rewritten after it was indexed): a skip naming the field
    for shard in sorted(shards.glob("*.tar")):
        for record in index.scan_shard(str(shard))["samples"]:
            if record["key"] in changes and record["key"] in bad:
                task = SampleTask(str(shard), record["start"], record["length"], 4, 16, 16, None, 0)
                skipped = load_example(SampleSettings(seed=7, stride=2), task)
                assert skipped.reason == "bad_metadata", (record["key"], skipped)
                assert changes[record["key"]][0] in skipped.detail, (record["key"], skipped)
