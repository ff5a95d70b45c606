"""Which SDPA kernel every attention call of a model runs (`train.attention_backend`), applied from outside.

The choice is a list of torch's SDPA kernels in priority order that the model's token layout carries
(`models/attention.py`); each attention call runs under `sdpa_kernel(backends, set_priority=True)`,
so the first kernel of the list that can run that call does. The context is entered around the SDPA
call itself, so the choice holds in the forward, in the recompute of a checkpointed block during
backward, and inside compiled blocks (Dynamo traces the context; no graph break).

- `auto`: the fastest kernels eligible on the device, fastest first. CUDA sm90+ (H100, H200, ...)
  with cuDNN 9: cudnn, flash, efficient, math; other CUDA devices: flash, efficient, math (flash
  needs sm80+ and no mask; the efficient kernel takes masks); CPU: flash (torch's CPU flash kernel,
  which takes masks too), math. Torch's own default order puts cudnn after math, so it never runs.
- `cudnn`, `flash`, `efficient`, `math`: exactly that kernel. A call it cannot run (a mask under
  flash or cudnn, a dtype or head size it lacks) fails with an error naming the option; a kernel
  the device has no build of (`cudnn` or `efficient` on CPU) fails here, before the first step.

The choice lives on `model.dit.layout`; `apply_sequence_parallel` keeps it when it swaps the
layout, so the two apply in either order. Apply it to every model that runs attention (the trained
one and a separately built EMA or sampling model).
"""

from __future__ import annotations

import torch

from ..models.attention import NAMED_BACKENDS, AttentionBackend
from ..models.denoiser import VideoDenoiser

CPU_KERNELS = ("flash", "math")  # the SDPA kernels torch has on CPU
CUDNN_ATTENTION_VERSION = 90000  # cuDNN 9: the first with the fused attention torch calls


def auto_backends(device: torch.device) -> tuple[str, ...]:
    """`auto`'s kernels on `device` (`NAMED_BACKENDS` names), fastest first."""
    if device.type != "cuda":
        return CPU_KERNELS
    fused = ("flash", "efficient", "math")
    if torch.cuda.get_device_capability(device) >= (9, 0) and _has_cudnn_attention():
        return ("cudnn", *fused)
    return fused


def _has_cudnn_attention() -> bool:
    """Whether torch was built with a cuDNN that has fused attention."""
    version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return version is not None and version >= CUDNN_ATTENTION_VERSION


def resolve_attention_backend(name: AttentionBackend, device: torch.device) -> tuple[str, ...]:
    """The SDPA kernels (`NAMED_BACKENDS` names), in priority order, that
    `train.attention_backend=name` allows on `device`.

    Raises ValueError for a name that is not an option, or for a kernel `device` has no build of."""
    if name == "auto":
        return auto_backends(device)
    if name not in NAMED_BACKENDS:
        choices = ", ".join(["auto", *NAMED_BACKENDS])
        raise ValueError(f"train.attention_backend must be one of {choices}, got {name!r}")
    if device.type != "cuda" and name not in CPU_KERNELS:
        raise ValueError(
            f"train.attention_backend={name} has no kernel on {device.type}; "
            f"there use auto, {', '.join(CPU_KERNELS)}"
        )
    return (name,)


def apply_attention_backend(model: VideoDenoiser, name: AttentionBackend, device: torch.device) -> None:
    """Make every attention call of `model`'s DiT (forward and recompute) run the kernels `name`
    allows on `device` (see the module docstring); before or after `apply_sequence_parallel`."""
    model.dit.layout.backends = resolve_attention_backend(name, device)
