"""Step (a) of bench/gpu: the machine, the library versions, and which SDPA kernel each attention
call pattern of the model runs, by default and under each `train.attention_backend` choice.

Patterns (bf16, head dim 128, 16 heads, through the project's own attention functions, forward
with inputs that need gradients):
self-attention without a mask; with a key-padding mask; MM-DiT's joint text-video attention with
no mask; cross-attention to captions of different lengths (a padded text mask). The kernel is read off the
profiler's ops (`aten::_scaled_dot_product_cudnn_attention`, `..._flash_attention`, ...). "default"
is torch's own choice with no kernel list; a choice that cannot run a pattern records the error.

Also checked: nothing on the training path imports av, decord or wandb when imported (they are
not installed where the bench runs), and whether the installed sora_train is this tree's code.

    python bench/gpu/environment.py --device cuda --out bench/gpu/out/environment.json
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import torch

REPO = Path(__file__).resolve().parents[2]
HEADS, HEAD_DIM = 16, 128
SIZES = {"cuda": (4096, 512), "cpu": (256, 32)}  # (video tokens S, text tokens T)
# Imported by the trainer, the bench and the GPU tests; none may import the lazily used packages.
TRAINING_PATH = (
    "sora_train.cli", "sora_train.train", "sora_train.loop.step", "sora_train.loop.engine",
    "sora_train.data.recipe", "sora_train.planning.plan", "sora_train.parallel.attention_backend",
    "deepspeed",
)  # fmt: skip
LAZY = ("av", "decord", "wandb", "matplotlib", "PIL")


def versions(device: torch.device) -> dict[str, Any]:
    """Python, torch, CUDA, cuDNN, DeepSpeed and NumPy versions; the device and its SDPA settings."""
    import deepspeed
    import numpy

    info: dict[str, Any] = {
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
        "numpy": numpy.__version__,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }  # fmt: skip
    attention = torch.nn.attention
    if hasattr(attention, "list_flash_attention_impls"):
        info["flash_impls_registered"] = list(attention.list_flash_attention_impls())
        info["flash_impl_active"] = attention.current_flash_attention_impl()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name, capability=list(torch.cuda.get_device_capability(device)),
            multiprocessors=props.multi_processor_count, memory_gib=common.gib(props.total_memory),
            sdp_enabled={
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(), "flash": torch.backends.cuda.flash_sdp_enabled(),
                "efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            },
        )  # fmt: skip
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def patterns(device: torch.device) -> dict[str, Callable[[tuple | None], object]]:
    """Each call pattern as a function of the kernel list (None: torch's default)."""
    from sora_train.models.attention import attention, joint_attention

    s, t = SIZES[device.type]

    def qkv(batch: int, length: int) -> tuple[torch.Tensor, ...]:
        shape = (batch, HEADS, length, HEAD_DIM)
        make = lambda: torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
        return tuple(make() for _ in range(3))  # as in training: some kernels differ without gradients

    video, text, pair, pair_text = qkv(1, s), qkv(1, t), qkv(2, s), qkv(2, t)
    key_padding = torch.ones(1, s, dtype=torch.bool, device=device)
    key_padding[:, s - s // 16 :] = False  # the tail a sequence-parallel split pads
    captions = torch.ones(2, t, dtype=torch.bool, device=device)
    captions[1, (t * 3) // 5 :] = False  # the second caption is shorter
    return {
        "self_attention": lambda b: attention(*video, None, b),
        "self_attention_key_padding": lambda b: attention(*video, key_padding, b),
        "joint_attention_unmasked": lambda b: joint_attention(video, text, None, b),
        "cross_attention_padded_text": lambda b: attention(pair[0], *pair_text[1:], captions, b),
    }


def dispatch_table(device: torch.device) -> dict[str, dict[str, Any]]:
    """pattern -> choice ("default" or a `train.attention_backend` value) -> the kernel that ran (e.g.
    "flash"), or the error."""
    table: dict[str, dict[str, Any]] = {}
    for name, call in patterns(device).items():
        row: dict[str, Any] = {}
        for choice in ("default", *common.CHOICES):
            try:
                kernels = None if choice == "default" else common.project_kernels(choice, device)
                ran = common.dispatched_kernels(lambda k=kernels, c=call: c(k))
                row[choice] = "+".join(ran) or "none"
            except (RuntimeError, ValueError) as error:
                row[choice] = {"error": str(error).strip().splitlines()[0][:300]}
        table[name] = row
    return table


def lazy_imports() -> dict[str, Any]:
    """Import the training path in a fresh interpreter; report the lazily used packages it pulled
    in, or the import error (with the traceback's last lines: the file and line that import it)."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(TRAINING_PATH)!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] in {list(LAZY)!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if result.returncode:
        return {"ok": False, "error": result.stderr.strip()[-2000:]}
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    return {"ok": not imported, "imported_eagerly": imported, "modules_checked": list(TRAINING_PATH)}


def source_matches_wheel() -> dict[str, Any]:
    """Whether the sora_train this interpreter imports holds this tree's sora_train/*.py files."""
    spec = importlib.util.find_spec("sora_train")
    installed = Path(spec.origin).parent if spec and spec.origin else None
    tree = REPO / "sora_train"
    if installed is None or installed == tree:
        return {"installed": str(installed), "matches_tree": installed == tree}
    differing = [
        str(path.relative_to(tree)) for path in sorted(tree.rglob("*.py"))
        if not (installed / path.relative_to(tree)).is_file()
        or _digest(path) != _digest(installed / path.relative_to(tree))
    ]  # fmt: skip
    return {"installed": str(installed), "matches_tree": not differing, "differing": differing[:10]}


def _digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepared_wheels() -> dict[str, Any] | None:
    """The target, commit and total of the wheels prepare.sh made (.whl/manifest.json), if any."""
    manifest = Path(os.environ.get("WHEELS", REPO / ".whl")) / "manifest.json"
    if not manifest.is_file():
        return None
    record = json.loads(manifest.read_text())
    return {"target": record["target"], "total_mb": round(record["total_bytes"] / 1e6, 2)}


def measure(device_name: str) -> dict[str, Any]:
    """The step's figures."""
    device = common.device_of(device_name)
    s, t = SIZES[device.type]
    imports = lazy_imports()
    return {
        "versions": versions(device),
        "sdpa_dispatch": dispatch_table(device),
        "sdpa_shapes": {
            "video_tokens": s,
            "text_tokens": t,
            "heads": HEADS,
            "head_dim": HEAD_DIM,
            "dtype": "bf16",
        },
        "lazy_imports": imports,
        "sora_train": source_matches_wheel(),
        "wheels": prepared_wheels(),
        "status": "ok" if imports["ok"] else "failed",
    }


def main() -> int:
    """Parse the arguments, measure, write the JSON."""
    args = common.parser(__doc__.split("\n\n")[0]).parse_args()
    return common.run_step("environment", args.device, args.out, lambda: measure(args.device))


if __name__ == "__main__":
    sys.exit(main())
