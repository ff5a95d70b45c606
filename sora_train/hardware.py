"""GPU types as data: memory and dense bf16 peak FLOP/s, for MFU and for memory planning.

Memory is the total the driver reports (`nvidia-smi`, in MiB), a little under the marketed
size. Peaks are NVIDIA's dense (no sparsity) bf16 tensor-core figures from the product
datasheets; the H100/H200 SXM figure is the design guide's 989e12.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIB = 2**20


@dataclass(frozen=True)
class GpuSpec:
    """One GPU type: its name here, memory, and dense bf16 peak."""

    name: str
    memory_bytes: int
    peak_flops: float  # dense bf16 FLOP/s
    markers: tuple[str, ...]  # lower-case parts every matching device name contains
    excludes: tuple[str, ...] = ()  # lower-case parts a matching device name must not contain


GPUS: tuple[GpuSpec, ...] = (
    # H100 SXM5 80GB: datasheet 1,979 TFLOPS bf16 with sparsity -> 989 dense; nvidia-smi 81559 MiB.
    GpuSpec("H100", 81559 * MIB, 989e12, ("h100",), ("pcie", "nvl")),
    # H100 PCIe 80GB: datasheet 1,513 TFLOPS bf16 with sparsity -> 756 dense.
    GpuSpec("H100-PCIe", 81559 * MIB, 756e12, ("h100", "pcie")),
    # H200 SXM 141GB: the H100 SXM's tensor cores (989 dense), more HBM; nvidia-smi 143771 MiB.
    GpuSpec("H200", 143771 * MIB, 989e12, ("h200",), ("nvl",)),
    # A100 SXM4/PCIe: datasheet 312 TFLOPS bf16 dense; nvidia-smi 81920 / 40960 MiB.
    GpuSpec("A100-80GB", 81920 * MIB, 312e12, ("a100", "80gb")),
    GpuSpec("A100-40GB", 40960 * MIB, 312e12, ("a100", "40gb")),
    # L40S 48GB: datasheet 362.05 TFLOPS bf16 dense (733 with sparsity); nvidia-smi 46068 MiB.
    GpuSpec("L40S", 46068 * MIB, 362.05e12, ("l40s",)),
)


def gpu_names() -> list[str]:
    """The GPU types this table knows, by the names `gpu_spec` accepts."""
    return [spec.name for spec in GPUS]


def gpu_spec(name: str) -> GpuSpec:
    """The GPU type called `name` (case-insensitive); ValueError naming the known types otherwise."""
    for spec in GPUS:
        if spec.name.lower() == name.strip().lower():
            return spec
    raise ValueError(f"unknown GPU type {name!r}; choose one of {', '.join(gpu_names())}")


def match_device_name(device_name: str) -> GpuSpec | None:
    """The table entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3'; None if none matches."""
    lowered = device_name.lower()
    for spec in GPUS:
        if all(m in lowered for m in spec.markers) and not any(x in lowered for x in spec.excludes):
            return spec
    return None


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of `device`: None on CPU or on a GPU type this table does not know."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    spec = match_device_name(torch.cuda.get_device_name(device))
    return spec.peak_flops if spec else None
