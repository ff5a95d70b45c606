"""The wheel carries its recipes and data tools; the Dockerfile copies what exists."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile

from .conftest import REPO


def test_wheel_ships_configs_and_data_prep(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("sora_train-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "sora_train/configs/train.yaml",
        "sora_train/configs/model/tiny.yaml",
        "sora_train/configs/experiment/demo.yaml",
        "sora_train/data_prep/cli.py",
        "sora_train/data/synthetic.py",
        "sora_train/data/synthetic_captions.py",
        "sora_train/data/shard_writer.py",
        "sora_train/cli.py",
        "sora_train/configs/hydra/launcher/slurm.yaml",
    ):
        assert expected in names, expected
    # every package of the source tree is in the wheel (a missing one only shows outside a checkout)
    for init in (REPO / "sora_train").rglob("__init__.py"):
        assert init.relative_to(REPO).as_posix() in names, init
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("sora-train", "sora-prep", "sora-sample", "sora-export", "sora-sweep", "sora-plan"):
        assert f"{script} =" in scripts


def test_dockerfile_copies_existing_paths():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    sources = [s for line in re.findall(r"^COPY (.+)$", dockerfile, re.MULTILINE) for s in line.split()[:-1]]
    assert sources, "no COPY lines"
    for source in sources:
        assert (REPO / source).exists(), source
    assert re.search(r'pip install "\.\[hf,slurm\]"', dockerfile)
