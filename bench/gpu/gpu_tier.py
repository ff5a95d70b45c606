"""Step (d) of bench/gpu: the GPU test tier, `pytest -m gpu -q`, as JSON.

It runs the test files that declare GPU tests (`pytest.mark.gpu` in their text): the other test
files import packages the bench does not install (av, decord, diffusers) and would fail to
collect. Third-party pytest plugins are not loaded (the GPU image has several, built for another
pytest). On a CPU (`--device cpu`) every GPU test skips itself; the tests' conftest is not loaded
there, since its session start builds DeepSpeed's CPU collective op (minutes on a cold machine)
for tests this tier does not run, and pytest's report goes to the JSON only. The result: pytest's
exit status, the counts from its JUnit XML, each test's outcome and the end of its report.

    python bench/gpu/gpu_tier.py --device cuda --out bench/gpu/out/gpu_tests.json
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import common

REPO = Path(__file__).resolve().parents[2]
MARKER = "pytest.mark.gpu"


def gpu_test_files() -> list[str]:
    """The test files (relative to the repository) that declare GPU tests."""
    return [
        str(path.relative_to(REPO))
        for path in sorted((REPO / "tests").glob("test_*.py"))
        if MARKER in path.read_text()
    ]


def outcomes(junit: Path) -> dict[str, Any]:
    """Counts and per-test outcomes from pytest's JUnit XML."""
    root = ElementTree.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    tests = []
    for case in suite.iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, message = {"failure": "failed"}.get(tag, tag), (found.get("message") or "")[:300]
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0)), "message": message})  # fmt: skip
    count = lambda outcome: sum(test["outcome"] == outcome for test in tests)  # noqa: E731
    return {"passed": count("passed"), "failed": count("failed"), "errors": count("error"),
            "skipped": count("skipped"), "tests": tests}  # fmt: skip


def measure(device: str, timeout: float) -> dict[str, Any]:
    """Run the tier, return its result."""
    files = gpu_test_files()
    with tempfile.TemporaryDirectory() as folder:
        junit = Path(folder) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", *files]  # fmt: skip
        if device == "cpu":
            command.insert(command.index("-q"), "--noconftest")
        env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1"}
        result = subprocess.run(
            command, cwd=REPO, env=env, timeout=timeout, check=False, capture_output=True, text=True
        )
        counts = outcomes(junit) if junit.is_file() else {"error": "pytest wrote no JUnit XML"}
    ran_nothing = device == "cuda" and counts.get("passed", 0) == 0  # on a GPU, all-skipped means no CUDA
    failed = result.returncode not in (0, 5) or counts.get("failed") or counts.get("errors") or ran_nothing
    tail = (result.stdout + result.stderr).strip().splitlines()[-40:]
    if device == "cuda" or failed:  # the CPU smoke mode keeps its all-skipped report to the JSON
        print("\n".join(tail))
    return {"command": " ".join(command[1:]), "files": files, "exit_status": result.returncode, **counts,
            "output_tail": tail, "status": "failed" if failed else "ok"}  # fmt: skip


def main() -> int:
    """Parse the arguments, run the tier, write the JSON."""
    parser = common.parser(__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=600, help="seconds before pytest is stopped")
    args = parser.parse_args()
    return common.run_step("gpu_tests", args.device, args.out, lambda: measure(args.device, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
