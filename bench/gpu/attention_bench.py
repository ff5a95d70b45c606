"""Step (b) of bench/gpu: attention TFLOP/s per SDPA kernel at long sequences, each checked against
an fp32 reference, and the project's `attention` under each `train.attention_backend` choice.

Self-attention of one sample, no mask, bf16, 16 heads of dim 128 (the 2B preset; 4 heads in the
CPU smoke mode), S tokens:

* **Kernels**: `F.scaled_dot_product_attention` under `sdpa_kernel([kernel])` for cudnn, flash,
  efficient and math (math only where its S x S scores fit: about 16 bytes per score for forward
  and backward; a kernel the device lacks is recorded as unavailable). Forward, and forward +
  backward (the gradients of q, k and v), median of the timed calls after warm-up.
* **Check**: each kernel's output and query gradient on 128 query rows spread over the sequence
  against an fp32 computation of those rows from the same bf16 inputs (exact for those rows: a
  row's output and query gradient depend on no other query), relative L2 error; fine up to 2e-2.
* **Project**: `sora_train.models.attention.attention(q, k, v, None, backends)` with the kernels
  `resolve_attention_backend(choice, device)` gives for each choice, as the trainer runs it.

FLOPs are the ones MFU counts (the design guide): 4·N·S²·K forward, 12·N·S²·K forward + backward
(the recompute of the scores inside the flash-style backward is not counted). Ratios are to the
fastest kernel at the same S. Target: `auto` within 0.95x of the fastest at every S.

    python bench/gpu/attention_bench.py --device cuda --out bench/gpu/out/attention.json
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import common
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEAD_DIM = 128
# device -> (sequence lengths, heads, warm-up calls, timed calls); the CPU smoke mode is small
DEFAULTS = {"cuda": ((8192, 32768, 65536), 16, 2, 5), "cpu": ((256, 512), 4, 1, 3)}
CHECK_ROWS = 128
TOLERANCE = 2e-2  # relative L2 error of bf16 attention against fp32 on the same inputs
TARGET = 0.95
SDPA = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
MATH_BYTES_PER_SCORE = 16  # fp32 scores, probabilities and their gradients held at once


class Inputs:
    """q, k, v (1, N, S, K) bf16 with gradients, the output gradient, and the reference rows."""

    def __init__(self, tokens: int, heads: int, device: torch.device, seed: int = 0):
        generator = torch.Generator(device=device).manual_seed(seed)
        shape = (1, heads, tokens, HEAD_DIM)
        make = lambda: torch.randn(shape, device=device, dtype=torch.bfloat16, generator=generator)  # noqa: E731
        self.q, self.k, self.v = (make().requires_grad_() for _ in range(3))
        self.grad_out = make()
        self.rows = torch.linspace(0, tokens - 1, min(CHECK_ROWS, tokens), device=device).long()
        self.reference = reference_rows(self.q, self.k, self.v, self.grad_out, self.rows)

    def forward_backward(self, call: Callable[..., torch.Tensor]) -> torch.Tensor:
        """One forward and backward of `call`; returns the output (gradients land on q, k, v)."""
        self.q.grad = self.k.grad = self.v.grad = None
        out = call(self.q, self.k, self.v)
        out.backward(self.grad_out)
        return out

    def errors(self, call: Callable[..., torch.Tensor]) -> dict[str, Any]:
        """Relative L2 errors of the output and the query gradient on the reference rows."""
        out = self.forward_backward(call)
        ref_out, ref_dq = self.reference
        got_out, got_dq = out.detach()[:, :, self.rows].float(), self.q.grad[:, :, self.rows].float()
        errors = {"output": relative_error(got_out, ref_out), "query_grad": relative_error(got_dq, ref_dq)}
        return {**errors, "rows": len(self.rows), "ok": max(errors.values()) <= TOLERANCE}


def reference_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 attention output and query gradient of the query rows `rows` (B, N, R, K) each."""
    scale = q.shape[-1] ** -0.5
    q_rows, k32, v32 = q.detach()[:, :, rows].float(), k.detach().float(), v.detach().float()
    probs = torch.softmax(q_rows @ k32.transpose(-1, -2) * scale, dim=-1)  # (B, N, R, S)
    out = probs @ v32
    grad_probs = grad_out[:, :, rows].float() @ v32.transpose(-1, -2)  # (B, N, R, S)
    grad_scores = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))
    return out, grad_scores @ k32 * scale


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖."""
    return float((got - want).norm() / want.norm())


def first_line(error: BaseException) -> str:
    """The first line of an error's message, at most 300 characters."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def release(device: torch.device) -> None:
    """Hand cached blocks back (after a failure or a sequence length), so the next one starts clean."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def kernel_call(kernel: str) -> Callable[..., torch.Tensor]:
    """SDPA restricted to one kernel."""

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([SDPA[kernel]]):
            return F.scaled_dot_product_attention(q, k, v)

    return call


def project_call(kernels: tuple) -> Callable[..., torch.Tensor]:
    """The project's attention with the kernels of a `train.attention_backend` choice."""
    from sora_train.models.attention import attention

    return lambda q, k, v: attention(q, k, v, None, kernels)


def math_fits(q: torch.Tensor) -> tuple[bool, str]:
    """Whether the math kernel's S x S scores for `q` fit in half the free memory (a GPU) or 2 GiB (CPU)."""
    _, heads, tokens, _ = q.shape
    device = q.device
    need = MATH_BYTES_PER_SCORE * heads * tokens * tokens
    free = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else 2 * 2**30
    return need <= free, f"needs about {need / 2**30:.0f} GiB for its scores, {free / 2**30:.0f} GiB allowed"


def timing(
    inputs: Inputs, call: Callable[..., torch.Tensor], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds and TFLOP/s of the forward and of forward + backward."""
    _, heads, tokens, _ = inputs.q.shape
    flops = 4 * heads * tokens * tokens * HEAD_DIM

    def forward() -> None:
        with torch.no_grad():
            call(inputs.q, inputs.k, inputs.v)

    fwd = common.median(common.time_calls(forward, device, warmup, repeats))
    both = common.median(common.time_calls(lambda: inputs.forward_backward(call), device, warmup, repeats))
    return {"forward_s": fwd, "forward_tflops": flops / fwd / 1e12,
            "forward_backward_s": both, "forward_backward_tflops": 3 * flops / both / 1e12}  # fmt: skip


def measure_tokens(inputs: Inputs, device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    """Every kernel and every project choice at one sequence length."""
    kernels: dict[str, dict[str, Any]] = {}
    for name in common.KERNELS:
        fits, why = math_fits(inputs.q) if name == "math" else (True, "")
        if not fits:
            kernels[name] = {"skipped": why}
            continue
        try:
            check = inputs.errors(kernel_call(name))
            kernels[name] = {**timing(inputs, kernel_call(name), device, warmup, repeats), "check": check}
        except RuntimeError as error:  # no such kernel on the device, inputs it cannot take, out of memory
            kernels[name] = {"unavailable": first_line(error)}
            release(device)
    timed = {name: row for name, row in kernels.items() if "forward_s" in row}
    best = {
        phase: min(timed, key=lambda n: timed[n][f"{phase}_s"]) for phase in ("forward", "forward_backward")
    }
    for row in timed.values():
        for phase, name in best.items():
            row[f"{phase}_ratio_to_best"] = timed[name][f"{phase}_s"] / row[f"{phase}_s"]
    project = measure_project(
        inputs, device, warmup, repeats, {p: timed[n][f"{p}_s"] for p, n in best.items()}
    )
    return {"tokens": inputs.q.shape[2], "kernels": kernels, "best": best, "project": project}


def measure_project(
    inputs: Inputs, device: torch.device, warmup: int, repeats: int, best_s: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """The project's attention under each `train.attention_backend` choice, with ratios to `best_s`."""
    rows: dict[str, dict[str, Any]] = {}
    fits, why = math_fits(inputs.q)
    for choice in common.CHOICES:
        try:
            kernels = common.project_kernels(choice, device)
        except ValueError as error:
            rows[choice] = {"unavailable": str(error)}
            continue
        if choice == "math" and not fits:
            rows[choice] = {"skipped": why}
            continue
        try:
            row = timing(inputs, project_call(kernels), device, warmup, repeats)
        except RuntimeError as error:
            rows[choice] = {"failed": first_line(error)}
            release(device)
            continue
        row["kernels"] = common.kernel_names(kernels)
        for phase, seconds in best_s.items():
            row[f"{phase}_ratio_to_best"] = seconds / row[f"{phase}_s"]
        rows[choice] = row
    return rows


def measure(args: Any) -> dict[str, Any]:
    """The step's figures at every sequence length, and whether `auto` met the target at each."""
    device = common.device_of(args.device)
    tokens, heads, warmup, repeats = DEFAULTS[device.type]
    results = []
    for length in args.tokens or tokens:
        results.append(measure_tokens(Inputs(length, heads, device), device, warmup, repeats))
        release(device)
    auto = [r["project"]["auto"].get("forward_backward_ratio_to_best", 0.0) for r in results]
    checks = [k["check"]["ok"] for r in results for k in r["kernels"].values() if "check" in k]
    return {
        "shape": {"batch": 1, "heads": heads, "head_dim": HEAD_DIM, "dtype": "bf16", "mask": None},
        "flops": "forward 4*N*S^2*K, forward+backward 12*N*S^2*K (as MFU counts them)",
        "results": results,
        "target": {"auto_forward_backward_ratio_to_best": TARGET, "worst": min(auto), "met": min(auto) >= TARGET},
        "checks_ok": all(checks),
        "status": "ok" if all(checks) else "failed",
    }  # fmt: skip


def main() -> int:
    """Parse the arguments, measure, write the JSON."""
    parser = common.parser(__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", help="sequence lengths (default: by device)")
    args = parser.parse_args()
    return common.run_step("attention", args.device, args.out, lambda: measure(args))


if __name__ == "__main__":
    sys.exit(main())
