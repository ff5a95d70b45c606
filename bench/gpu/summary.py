"""The end of bench/gpu: one summary JSON of the four steps' results, and a short table.

Reads OUT/environment.json, attention.json, mfu.json and gpu_tests.json (a step that wrote
nothing counts as failed), writes OUT/summary.json, prints the table, and exits 1 when a step
failed. Missing a performance target is reported, not an exit status: CPU figures never meet them.

    python bench/gpu/summary.py --out bench/gpu/out
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

STEPS = ("environment", "attention", "mfu", "gpu_tests")


def load(out: Path) -> dict[str, dict[str, Any]]:
    """Each step's JSON, or a failed stand-in when it wrote none."""
    results = {}
    for step in STEPS:
        path = out / f"{step}.json"
        results[step] = (
            json.loads(path.read_text()) if path.is_file() else {"status": "failed", "error": "no result"}
        )
    return results


def attention_rows(attention: dict[str, Any]) -> list[dict[str, Any]]:
    """Per sequence length: forward + backward TFLOP/s per kernel, the best, and auto's ratio."""
    rows = []
    for result in attention.get("results", []):
        kernels = result["kernels"]
        auto = result["project"].get("auto", {})
        rows.append({
            "tokens": result["tokens"],
            "tflops": {name: row.get("forward_backward_tflops") for name, row in kernels.items()},
            "best": result["best"]["forward_backward"],
            "auto_kernels": auto.get("kernels"),
            "auto_ratio_to_best": auto.get("forward_backward_ratio_to_best"),
            "checks_ok": all(row["check"]["ok"] for row in kernels.values() if "check" in row),
        })  # fmt: skip
    return rows


def mfu_rows(mfu: dict[str, Any]) -> dict[str, Any]:
    """The MFU run's settings and, per backend choice, its step figures."""
    keys = (
        "kernels",
        "step_s",
        "tflops",
        "mfu_vs_989",
        "mfu_vs_gemm",
        "peak_gib",
        "memory_ratio",
        "unavailable",
    )
    return {
        "run": mfu.get("run"),
        "gemm_tflops": mfu.get("gemm", {}).get("tflops"),
        "planned_peak_gib": mfu.get("planned_peak_gib"),
        "backends": {
            name: {k: row[k] for k in keys if k in row} for name, row in mfu.get("backends", {}).items()
        },
        "top_kernels": [row["name"] for row in mfu.get("profile", {}).get("top", [])[:5]],
    }


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The summary JSON."""
    env = results["environment"]
    versions = env.get("versions", {})
    dispatch = {
        name: {c: row.get(c) for c in ("default", "auto")}
        for name, row in env.get("sdpa_dispatch", {}).items()
    }
    tests = results["gpu_tests"]
    return {
        "device": results["environment"].get("device"), "device_name": versions.get("device_name"),
        "versions": {k: versions.get(k) for k in ("python", "torch", "cuda", "cudnn", "deepspeed")},
        "capability": versions.get("capability"), "wheels": env.get("wheels"),
        "steps": {step: {"status": r.get("status"), "seconds": r.get("seconds")} for step, r in results.items()},
        "ok": all(r.get("status") == "ok" for r in results.values()),
        "lazy_imports_ok": env.get("lazy_imports", {}).get("ok"), "sdpa_dispatch": dispatch,
        "sora_train_matches_tree": env.get("sora_train", {}).get("matches_tree"),
        "attention": attention_rows(results["attention"]), "mfu": mfu_rows(results["mfu"]),
        "gpu_tests": {k: tests.get(k) for k in ("passed", "failed", "errors", "skipped")},
        "targets": {"attention_auto_within_0.95_of_best": results["attention"].get("target", {}).get("met"),
                    "mfu_45pct_of_989": results["mfu"].get("targets", {}).get("mfu_met"),
                    "peak_memory_within_10pct_of_plan": results["mfu"].get("targets", {}).get("memory_met")},
    }  # fmt: skip


def number(value: float | None, digits: int = 2, spec: str = "f") -> str:
    """A figure for the table ('g': `digits` significant digits); '-' when absent."""
    return "-" if value is None else f"{value:.{digits}{spec}}"


def table(summary: dict[str, Any]) -> str:
    """The short text table."""
    v = summary["versions"]
    lines = [f"bench/gpu on {summary['device_name']} ({summary['device']}): torch {v['torch']}, CUDA {v['cuda']}, "
             f"cuDNN {v['cudnn']}, DeepSpeed {v['deepspeed']}, Python {v['python']}"]  # fmt: skip
    lines += [
        f"  {step:<12} {s['status']:<7} {number(s['seconds'], 1):>7} s"
        for step, s in summary["steps"].items()
    ]
    attention = summary["attention"]
    if attention:
        lines.append(
            "attention fwd+bwd TFLOP/s " + "".join(f"{'S=' + str(r['tokens']):>10}" for r in attention)
        )
        for name in attention[0]["tflops"]:
            lines.append(
                f"  {name:<24}" + "".join(f"{number(r['tflops'].get(name), 3, 'g'):>10}" for r in attention)
            )
        lines.append(
            f"  {'auto / best':<24}" + "".join(f"{number(r['auto_ratio_to_best']):>10}" for r in attention)
        )
    mfu = summary["mfu"]
    if mfu["run"]:
        run = mfu["run"]
        lines.append(f"MFU {run['preset']} at {run['video_tokens']} tokens, checkpointing {run['activation_checkpointing']}, "
                     f"GEMM {number(mfu['gemm_tflops'], 3, 'g')} TFLOP/s, planned peak {number(mfu['planned_peak_gib'])} GiB")  # fmt: skip
        lines.append(f"  {'backend':<10}{'step s':>8}{'/989':>8}{'/GEMM':>8}{'peak GiB':>10}{'/plan':>8}")
        for name, row in mfu["backends"].items():
            lines.append(f"  {name:<10}{number(row.get('step_s'), 3):>8}{number(row.get('mfu_vs_989'), 3):>8}"
                         f"{number(row.get('mfu_vs_gemm'), 3):>8}{number(row.get('peak_gib')):>10}"
                         f"{number(row.get('memory_ratio'), 3):>8}")  # fmt: skip
    t = summary["gpu_tests"]
    lines.append(
        f"GPU test tier (pytest -m gpu): passed {t['passed']}, failed {t['failed']}, errors {t['errors']}, "
        f"skipped {t['skipped']}"
    )
    lines.append("targets: " + ", ".join(f"{k} {v}" for k, v in summary["targets"].items()))
    if summary["sora_train_matches_tree"] is False:
        lines.append("WARNING: the installed sora_train is not this tree's code (rerun prepare.sh)")
    lines.append("all steps ok" if summary["ok"] else "A STEP FAILED: see its JSON")
    return "\n".join(lines)


def main() -> int:
    """Summarise OUT, print the table; 1 when a step failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder the steps wrote into")
    args = parser.parse_args()
    summary = summarise(load(args.out))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(table(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
