"""sora-sweep: the runs of a sweep side by side, with the settings they vary, their final
validation loss and throughput, as a Markdown table (sweep.md) and a plot (sweep.png).

    sora-sweep multirun/2026-11-22_10-00-00        # the sweep dir of `sora-train -m ...`
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

from .metrics import final_validation_loss, read_metrics
from .plots import sweep_png
from .run_info import RUN_INFO, read_run_info


def find_runs(root: Path) -> list[Path]:
    """Run dirs under `root` (those with a run_info.json), in job order."""
    runs = [path.parent for path in root.rglob(RUN_INFO)]
    return sorted(runs, key=lambda run: [int(p) if p.isdigit() else p for p in run.relative_to(root).parts])


def summarize(run: Path) -> dict:
    """What a run was told (its overrides as a dict) and what it measured."""
    overrides = read_run_info(run).get("overrides", [])
    rows = read_metrics(run)
    steps = [row for row in rows if "loss" in row]
    return {
        "run": run.name,
        "settings": dict(override.split("=", 1) for override in overrides if "=" in override),
        "steps": steps[-1]["step"] if steps else 0,
        "train_loss": steps[-1]["loss"] if steps else math.nan,
        "val_loss": math.nan if (val_loss := final_validation_loss(run)) is None else val_loss,
        "tokens_per_s": statistics.median(row["tokens_per_s"] for row in steps) if steps else math.nan,
    }


def varying(summaries: list[dict]) -> list[str]:
    """Settings whose value differs between runs (the swept ones)."""
    keys = sorted({key for summary in summaries for key in summary["settings"]})
    return [key for key in keys if len({summary["settings"].get(key) for summary in summaries}) > 1]


def table(summaries: list[dict], keys: list[str]) -> str:
    """Markdown: one row per run, best validation loss first."""
    header = ["run", *keys, "steps", "final val loss", "final train loss", "tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in sorted(summaries, key=lambda s: (math.isnan(s["val_loss"]), s["val_loss"])):
        cells = [s["run"], *(s["settings"].get(key, "") for key in keys), str(s["steps"]),
                 f"{s['val_loss']:.4f}", f"{s['train_loss']:.4f}", f"{s['tokens_per_s']:.0f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summaries: list[dict], keys: list[str], path: Path) -> None:
    """Write the sweep's figure (`plots.sweep_png`: final validation loss per run) to `path`."""
    path.write_bytes(sweep_png(summaries, keys))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sora-sweep`."""
    parser = argparse.ArgumentParser(prog="sora-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "sweep_dir", type=Path, help="a sweep dir (hydra.sweep.dir) or any folder of run dirs"
    )
    parser.add_argument("--out", type=Path, help="where sweep.md and sweep.png go (default: the sweep dir)")
    args = parser.parse_args(argv)
    runs = find_runs(args.sweep_dir)
    if not runs:
        print(f"error: no runs (run_info.json) under {args.sweep_dir}", file=sys.stderr)
        return 2
    summaries = [summarize(run) for run in runs]
    keys = varying(summaries)
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    report = table(summaries, keys)
    (out / "sweep.md").write_text(report)
    plot(summaries, keys, out / "sweep.png")
    print(report + f"\nwrote {out / 'sweep.md'} and {out / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
