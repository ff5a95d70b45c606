"""The checkpoint directory of a run, and the filesystem moves that keep it consistent.

RUN_DIR/checkpoints/
  step_XXXXXXX/              committed checkpoints (each with its manifest)
  .staging-step_XXXXXXX/     a save in progress; left behind only by a crash, never resumed from
  step_XXXXXXX.universal/    a checkpoint converted for a different number of ranks
  latest                     the newest committed checkpoint's name, replaced atomically
  abandoned-YYYYmmdd-HHMMSS/ checkpoints newer than the one a run went back to, moved aside

A save becomes visible in one rename; deletion renames first too, so no committed
checkpoint is ever seen half-written or half-deleted.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from .manifest import CheckpointInvalid, file_problems, fsync_path, read_manifest

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
ABANDONED_PREFIX = "abandoned-"
UNIVERSAL_SUFFIX = ".universal"
_STEP_NAME = re.compile(r"^step_(\d{7,})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    """RUN_DIR/checkpoints."""
    return Path(run_dir) / CHECKPOINTS


def tag_for(step: int) -> str:
    """Directory name of the checkpoint at `step`."""
    return f"step_{step:07d}"


def step_of(directory: Path) -> int:
    """The step a checkpoint directory was saved at."""
    match = _STEP_NAME.match(directory.name)
    if match is None:
        raise CheckpointInvalid(f"{directory} is not named step_XXXXXXX")
    return int(match[1])


def is_checkpoint_dir(path: Path) -> bool:
    """Named like a committed checkpoint (its contents are not checked)."""
    return path.is_dir() and _STEP_NAME.match(path.name) is not None


class CheckpointStore:
    """RUN_DIR/checkpoints: where saves are staged, committed, listed and pruned."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def final_dir(self, step: int) -> Path:
        return self.root / tag_for(step)

    def staging_dir(self, step: int) -> Path:
        return self.root / f"{STAGING_PREFIX}{tag_for(step)}"

    def universal_dir(self, step: int) -> Path:
        return self.root / f"{tag_for(step)}{UNIVERSAL_SUFFIX}"

    def committed(self) -> list[Path]:
        """Committed checkpoint directories, newest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if is_checkpoint_dir(p)), key=step_of, reverse=True)

    def interrupted(self) -> list[Path]:
        """Saves that never committed (a crash or kill during the save)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.name.startswith(STAGING_PREFIX))

    def begin(self, step: int) -> Path:
        """Clear leftovers of interrupted saves and deletions; create and return the staging dir."""
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.iterdir():
            if leftover.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(leftover, ignore_errors=True)
        staging = self.staging_dir(step)
        staging.mkdir()
        return staging

    def commit(self, step: int) -> Path:
        """Publish the staged save in one rename (replacing an older save of the same step), then
        point `latest` at it. Both the rename and the pointer are flushed to disk."""
        final = self.final_dir(step)
        if final.exists():
            self._discard(final)
        os.replace(self.staging_dir(step), final)
        fsync_path(self.root)
        self.point_latest(final.name)
        return final

    def point_latest(self, name: str) -> None:
        """Replace `latest` atomically with `name`."""
        pointer = self.root / f".{LATEST}.tmp"
        with open(pointer, "w") as handle:
            handle.write(name + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(pointer, self.root / LATEST)
        fsync_path(self.root)

    def latest_name(self) -> str | None:
        """The name `latest` points at, if any."""
        try:
            return (self.root / LATEST).read_text().strip() or None
        except OSError:
            return None

    def prune(self, keep_last: int, keep_every: int, keep: tuple[str, ...] = ()) -> list[Path]:
        """Delete committed checkpoints beyond the newest `keep_last` complete ones (0: keep all),
        except those at multiples of `keep_every`, those named in `keep` (the save just written)
        and the one `latest` names. Incomplete ones never count towards `keep_last`, and the newest
        complete one is never deleted. Returns what was deleted."""
        if keep_last <= 0:
            return []
        spared = {*keep, self.latest_name()}
        complete = [directory for directory in self.committed() if _looks_complete(directory)]
        doomed = [
            directory for directory in complete[keep_last:]
            if not (keep_every and step_of(directory) % keep_every == 0) and directory.name not in spared
        ]  # fmt: skip
        for directory in doomed:
            self._discard(directory)
            universal = self.universal_dir(step_of(directory))
            if universal.exists():
                self._discard(universal)
        return doomed

    def set_aside_newer(self, step: int, delete: bool = False) -> list[str]:
        """Take the committed checkpoints saved after `step` (a branch the run went back from) out of
        the run: moved into `abandoned-<time>/` with their universal conversions, or deleted. `latest`
        then names the newest checkpoint left, if any. Returns the names taken out, oldest first."""
        newer = sorted((d for d in self.committed() if step_of(d) > step), key=step_of)
        if not newer:
            return []
        aside = self._unused(f"{ABANDONED_PREFIX}{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
        for directory in newer:
            for moved in (directory, self.universal_dir(step_of(directory))):
                if not moved.exists():
                    continue
                if delete:
                    self._discard(moved)
                else:
                    aside.mkdir(exist_ok=True)
                    os.replace(moved, aside / moved.name)
        left = self.committed()
        if left:
            self.point_latest(left[0].name)
        else:
            (self.root / LATEST).unlink(missing_ok=True)
        fsync_path(self.root)
        return [directory.name for directory in newer]

    def _unused(self, name: str) -> Path:
        """RUN_DIR/checkpoints/NAME, or NAME-2, NAME-3... if it is taken."""
        path, number = self.root / name, 1
        while path.exists():
            number += 1
            path = self.root / f"{name}-{number}"
        return path

    def _discard(self, directory: Path) -> None:
        trash = self.root / f"{TRASH_PREFIX}{directory.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _looks_complete(directory: Path) -> bool:
    """Its manifest reads and every listed file has the listed size (no checksums: cheap)."""
    try:
        manifest = read_manifest(directory)
    except CheckpointInvalid:
        return False
    return not file_problems(directory, manifest, list(manifest["files"]), deep=False)
