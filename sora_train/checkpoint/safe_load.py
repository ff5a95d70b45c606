"""Loading DeepSpeed's checkpoint files without running arbitrary pickles.

DeepSpeed reads its own files with `torch.load(weights_only=False)`, which executes whatever a
pickle asks for. Inside `weights_only_loads()`, every `torch.load` (DeepSpeed's included) runs
with `weights_only=True`, allowing only tensors, plain containers and the three DeepSpeed
classes its optimizer states hold. A crafted file raises `UnsafeCheckpoint` instead of running.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
from collections.abc import Iterator

import torch


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file asked to build something other than tensors and plain data."""


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes a ZeRO optimizer state file legitimately holds."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within this block, `torch.load` refuses anything but weights and plain data (any caller)."""
    original = torch.load

    @functools.wraps(original)
    def restricted(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return original(*args, **kwargs)
        except pickle.UnpicklingError as error:
            source = args[0] if args else kwargs.get("f")
            raise UnsafeCheckpoint(
                f"{source} holds more than weights and plain data; it was not written by this trainer "
                f"and is not loaded ({str(error).splitlines()[0]})"
            ) from None

    torch.load = restricted
    try:
        yield
    finally:
        torch.load = original
