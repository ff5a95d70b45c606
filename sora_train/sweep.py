"""sora-sweep: the runs of a sweep side by side, with the settings they vary, their final
validation loss and throughput, as a Markdown table (sweep.md) and a plot (sweep.png).

    sora-sweep multirun/2026-11-22_10-00-00        # the sweep dir of `sora-train -m ...`
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from .metrics import final_validation_loss, read_metrics
from .run_info import RUN_INFO


def find_runs(root: Path) -> list[Path]:
    """Run dirs under `root` (those with a run_info.json), in job order."""
    runs = [path.parent for path in root.rglob(RUN_INFO)]
    return sorted(runs, key=lambda run: [int(p) if p.isdigit() else p for p in run.relative_to(root).parts])


def summarize(run: Path) -> dict:
    """What a run was told (its overrides as a dict) and what it measured."""
    overrides = json.loads((run / RUN_INFO).read_text()).get("overrides", [])
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
    """Final validation loss against the one numeric swept setting (log axis when it spans 10×),
    or one bar per run labelled with its settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    values = [_number(s["settings"].get(keys[0])) for s in summaries] if len(keys) == 1 else []
    if values and all(value is not None for value in values):
        order = sorted(range(len(values)), key=values.__getitem__)
        axes.plot([values[i] for i in order], [summaries[i]["val_loss"] for i in order], marker="o")
        if min(values) > 0 and max(values) >= 10 * min(values):
            axes.set_xscale("log")
        axes.set_xlabel(keys[0])
    else:
        labels = [", ".join(f"{k}={s['settings'].get(k)}" for k in keys) or s["run"] for s in summaries]
        axes.bar(range(len(summaries)), [s["val_loss"] for s in summaries])
        axes.set_xticks(range(len(summaries)), labels, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("final validation loss")
    axes.set_title(f"{len(summaries)} runs")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


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
