"""Where `sora-prep shards` reads its videos from, one item at a time.

SRC is either a folder (walked recursively in sorted order, a directory at a time, so memory does
not grow with the corpus; each video's caption is in a sidecar `NAME.txt`, or `NAME.json` with a
`caption` field) or a list file: CSV with a header, or JSONL, with `path`, `caption` and optional
`start` / `end` seconds (relative paths are relative to the list file).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg", ".mpeg"})


@dataclass(frozen=True)
class SourceItem:
    """One input video (or a window of one): its position in the input, where it is, its caption.

    `source` is how the item is named in rejects, keys and the split hash: the path relative to
    the folder for a folder SRC, the path as written for a list file.
    """

    index: int
    source: str
    path: str
    caption: str | None
    start: float | None = None
    end: float | None = None
    caption_error: str = ""


def iter_sources(src: str | Path) -> Iterator[SourceItem]:
    """Every input item of SRC, in a stable order."""
    src = Path(src)
    if src.is_dir():
        return _folder_items(src)
    if src.suffix.lower() == ".csv":
        return _list_items(src, _csv_rows(src))
    if src.suffix.lower() in (".jsonl", ".ndjson"):
        return _list_items(src, _jsonl_rows(src))
    if not src.exists():
        raise ValueError(f"--src {src} does not exist")
    raise ValueError(f"--src {src}: expected a folder, a .csv or a .jsonl file")


def _walk_sorted(root: Path) -> Iterator[Path]:
    """Files under root, depth first, each directory's entries sorted by name."""
    with os.scandir(root) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_sorted(Path(entry.path))
        else:  # files, and anything else that claims to be one (a FIFO is probed, and times out)
            yield Path(entry.path)


def read_sidecar_caption(video: Path) -> tuple[str | None, str]:
    """(caption, problem) from `video`'s .txt or .json sidecar; caption None when there is none."""
    text_file, json_file = video.with_suffix(".txt"), video.with_suffix(".json")
    try:
        if text_file.is_file():
            caption = text_file.read_text(encoding="utf-8").strip()
            return (caption or None), ("" if caption else "empty .txt sidecar")
        if json_file.is_file():
            caption = json.loads(json_file.read_text(encoding="utf-8")).get("caption")
            if isinstance(caption, str) and caption.strip():
                return caption.strip(), ""
            return None, "no 'caption' string in .json sidecar"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as error:
        return None, f"unreadable sidecar: {error}"
    return None, "no .txt or .json sidecar"


def _folder_items(root: Path) -> Iterator[SourceItem]:
    index = 0
    for path in _walk_sorted(root):
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            continue
        caption, problem = read_sidecar_caption(path)
        yield SourceItem(index, path.relative_to(root).as_posix(), str(path), caption, caption_error=problem)
        index += 1


def _csv_rows(path: Path) -> Iterator[dict]:
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ValueError(f"{path}: a CSV source needs a header with at least 'path' and 'caption'")
        yield from reader


def _jsonl_rows(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}:{number}: not JSON: {error}") from error
            if not isinstance(row, dict) or "path" not in row:
                raise ValueError(f"{path}:{number}: each line needs an object with 'path' and 'caption'")
            yield row


def _seconds(value: object, what: str, row: dict) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"bad {what} {value!r} in row {row!r}") from error


def _list_items(list_file: Path, rows: Iterator[dict]) -> Iterator[SourceItem]:
    base = list_file.resolve().parent
    for index, row in enumerate(rows):
        written = str(row["path"])
        path = Path(written) if Path(written).is_absolute() else base / written
        caption = row.get("caption")
        caption = caption.strip() if isinstance(caption, str) and caption.strip() else None
        start, end = _seconds(row.get("start"), "start", row), _seconds(row.get("end"), "end", row)
        problem = "" if caption else "no caption in the list"
        yield SourceItem(index, written, str(path), caption, start, end, problem)
