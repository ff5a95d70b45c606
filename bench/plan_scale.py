"""How long planning an epoch takes and how much memory it holds, and what resuming into a late
epoch costs against the first, for a large synthetic index (no media: the plan reads only the
per-sample shard and bucket arrays).

Each measurement runs in a fresh process (peak RSS is per process). With `--against DIR`, the same
measurements run on the `sora_train` of another checkout, interleaved with this tree's, and the
ratios are printed side by side (e.g. `git worktree add /tmp/before OLD_COMMIT`).

    python bench/plan_scale.py [--samples 1000000] [--repeats 5] [--against /tmp/before]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Runs in the child: plan epoch 0 of a fresh planner, then seek into epoch 5 of another.
CHILD = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from sora_train.data.plan import EpochPlanner

n, weights = int(sys.argv[2]), tuple(json.loads(sys.argv[3]))
def planner():
    buckets = (np.arange(n) % len(weights)).astype(np.int16)
    shards = np.arange(0, n + 1, n // 1000)  # 1000 shards: their bounds, or (older trees) each sample's
    if "shard_bounds" not in EpochPlanner.__dataclass_fields__:
        shards = np.repeat(np.arange(1000), n // 1000)
    return EpochPlanner(0, shards, buckets, (1,) * len(weights), weights, 0, 256)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
planner().batch(0)
first = time.perf_counter() - start
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
counting = planner()
length = getattr(counting, "epoch_length", lambda e: len(counting.epoch(e)))  # older trees plan it
position = sum(length(e) for e in range(5))  # the first batch of epoch 5
start = time.perf_counter()
planner().batch(position)
print(json.dumps({"epoch0_s": first, "rss_mb": grown, "epoch5_s": time.perf_counter() - start}))
"""


def measure(tree: Path, samples: int, weights: tuple[float, ...]) -> dict:
    """One fresh process's figures for the `sora_train` under `tree`."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), str(samples), json.dumps(weights)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--against", type=Path, default=None, help="another checkout to compare with")
    args = parser.parse_args(argv)
    trees = {"this tree": REPO} | ({"against": args.against} if args.against else {})
    print(f"{args.samples:,} samples in 1000 shards, batch size 1, medians of {args.repeats} fresh processes")
    print(
        "| tree | bucket weights | plan epoch 0 (s) | peak RSS growth (MB) | seek into epoch 5 (s) | epoch 5 / epoch 0 |"
    )
    print("|---|---|---|---|---|---|")
    for weights in ((1.0, 1.0), (1.0, 0.5)):
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.repeats):  # interleaved
            for name, tree in trees.items():
                runs[name].append(measure(tree, args.samples, weights))
        for name, figures in runs.items():
            median = {key: statistics.median(run[key] for run in figures) for key in figures[0]}
            print(f"| {name} | {weights} | {median['epoch0_s']:.2f} | {median['rss_mb']:.0f} | "
                  f"{median['epoch5_s']:.2f} | {median['epoch5_s'] / median['epoch0_s']:.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
