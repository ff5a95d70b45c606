"""torch.compile per transformer block, applied to a model from outside (the model code stays plain).

Each block of `model.dit.blocks` is compiled in place with `nn.Module.compile`, which keeps the
module (no `_orig_mod.` wrapper), so parameter names, state-dict keys and the module tree that
DeepSpeed wraps are unchanged. Blocks of one kind share their code, so one compilation serves
them all (a new bucket shape recompiles once, then with dynamic shapes). What else is a new graph:
a batch whose captions all keep every token attends without a text mask
(`models/attention.drop_caption_padding`), so training compiles a masked and an unmasked graph per
kind of block; forwards without gradients (validation) compile their own. Past
`torch._dynamo.config.recompile_limit` graphs of one kind of block (8), Dynamo warns and runs
that block eagerly. The RoPE table the blocks read is built outside them, once per grid
(`models/rope.py`), so the compiled graphs hold no cos/sin of their own; adaLN's modulation and
gates fuse into the kernels of their neighbouring norms and residual adds (tests/test_compile.py
checks that compiled blocks train as eager ones do).

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
