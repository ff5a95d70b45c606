"""Checkpoints that never lie: atomic saves with a verified manifest, exact and elastic resume.

`saving` writes a checkpoint (collective, atomic); `resuming` picks the newest valid one and
loads it; `store` owns the directory layout; `manifest` the file checksums; `safe_load` keeps
DeepSpeed's loads to weights and plain data; `universal` converts for a new number of ranks;
`rng` captures every random stream.
"""

from .manifest import CheckpointInvalid
from .resuming import Selection, find_checkpoint, verify_checkpoint
from .saving import CheckpointSaveFailed, PendingSave, save_checkpoint
from .store import CheckpointStore, checkpoint_root, step_of, tag_for

__all__ = [
    "CheckpointInvalid", "CheckpointSaveFailed", "CheckpointStore", "PendingSave", "Selection", "checkpoint_root",
    "find_checkpoint", "save_checkpoint", "step_of", "tag_for", "verify_checkpoint",
]  # fmt: skip
