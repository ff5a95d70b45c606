"""torch.compile per transformer block, applied to a model from outside (the model code stays plain).

Each block of `model.dit.blocks` is compiled in place with `nn.Module.compile`, which keeps the
module (no `_orig_mod.` wrapper), so parameter names, state-dict keys and the module tree that
DeepSpeed wraps are unchanged. Blocks of one kind share their code, so one compilation serves
them all (a new bucket shape recompiles once, then with dynamic shapes).

Order: `nn.Module.compile` compiles the block's `__call__`, which reads `forward` when it runs,
so the compiled graph takes in the checkpoint wrapper of `parallel/checkpointing.py` whether
checkpointing is applied before or after (the trainer applies it before); that wrapper is a
traceable function, so the checkpoint becomes a higher-order op in the graph and a selective
policy's choices become recompute tags the partitioner honours. Both come before DeepSpeed's
engine, which wraps the same modules under the same names (`torch.compile(block)` instead would
put every parameter under `_orig_mod.` and break checkpoints). ZeRO-1/2 compile whole blocks.
Under ZeRO-3 DeepSpeed's parameter-gathering hooks are excluded from compilation and break each
block's graph into pieces (a checkpointed block then runs eagerly); it still computes the same
losses, but compiling pays off little there.
"""

from __future__ import annotations

from ..models.denoiser import VideoDenoiser


def apply_block_compile(model: VideoDenoiser, backend: str = "inductor") -> None:
    """Compile each of `model.dit.blocks` in place with torch.compile's `backend` (inductor
    generates fused kernels; aot_eager captures and partitions the same graphs without them)."""
    for block in model.dit.blocks:
        block.compile(backend=backend)
