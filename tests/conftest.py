"""Shared fixtures: a small synthetic corpus and a way to run the CLIs as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Shard indexes of test corpora stay out of the user's cache (subprocesses inherit this).
os.environ.setdefault("SORA_CACHE_DIR", tempfile.mkdtemp(prefix="sora_test_cache_"))

# A DiT small enough that a CPU step takes milliseconds; clips of 4 frames at 16×16 pixels.
FAST = [
    "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=[2,4,4]",
    "model.text_dim=32", "model.text_depth=1", "model.text_heads=2", "model.text_vocab_size=256",
    "data.num_frames=4", "data.height=16", "data.width=16", "data.shuffle_buffer=16",
    "wandb.mode=disabled", "train.log_every=1", "diffusion.sample_steps=2", "optim.warmup_steps=2",
]  # fmt: skip


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build DeepSpeed's CPU shared-memory collective op once, before any timed subprocess.

    On a machine without a GPU, DeepSpeed compiles this op the first time a process calls
    `init_distributed` (minutes on two cores) and caches it under ~/.cache/torch_extensions.
    Building it here keeps that one-off cost out of the per-test timeouts.
    """
    build = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    subprocess.run([sys.executable, "-c", build], capture_output=True, timeout=1800, check=False)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic corpus: 64 training clips in 8 shards, 16 validation clips."""
    from sora_train.data.synthetic import generate_corpus

    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, num_train=64, num_val=16, seed=0, samples_per_shard=8)
    return root


@pytest.fixture(scope="session")
def two_process_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted reference: 8 steps on 2 processes with ZeRO-2, a checkpoint every 4 steps."""
    run_dir = tmp_path_factory.mktemp("run") / "uninterrupted"
    assert_ok(run_train(*run_args(corpus), f"run_dir={run_dir}", "launch.nproc_per_node=2"))
    return run_dir


def run_args(corpus: Path) -> list[str]:
    """The 2-process runs' overrides, except where its run dir is and how its processes start.

    Three buckets with a 96-token budget: batches of 3 square clips (32 tokens each) or 2
    landscape or portrait ones (48 tokens each).
    """
    return [
        *FAST, f"data.train={corpus / 'train'}", f"data.val={corpus / 'val'}", "parallel.zero_stage=2", "train.max_steps=8", "checkpoint.every=4",
        "train.global_batch_size=4", "train.sample_prompts=[a red square moving left on a black background]",
        f"data.buckets={Path(__file__).parent / 'buckets_tiny.yaml'}", "data.tokens_per_batch=96", "train.log_keys=true", "eval.val_every=4",
    ]  # fmt: skip


def run_python(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python args` in a fresh process from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def run_module(
    module: str, *args: str, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m module args` in a fresh process, output captured."""
    return run_python("-m", module, *args, timeout=timeout, env=env)


def run_script(script: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python script args` in a fresh process, output captured."""
    return run_python(str(script), *args, timeout=timeout)


def run_train(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run sora-train with the given overrides."""
    return run_module("sora_train.cli", *args, timeout=timeout)


def run_torchrun(nproc: int, script: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a script under `torchrun --standalone --nproc-per-node nproc`."""
    return run_module(
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
        *args,
        timeout=timeout,
    )


def assert_ok(result: subprocess.CompletedProcess) -> None:
    """Fail with the process' output when it did not exit 0."""
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
