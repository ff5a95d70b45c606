"""The wheels a GPU machine without a network needs to run bench/gpu: what prepare.sh asks of pip.

Standard library only: it runs before anything is installed. Subcommands (prepare.sh calls them in
this order):

    wheels.py platforms --arch x86_64 --glibc 2.36       pip's --platform flags for that target
    wheels.py requirements PROJECT.whl                    what the trainer, the bench and the GPU
                                                          tests need (one requirement a line)
    wheels.py source-only PROJECT.whl                     the requirements that ship only a source
                                                          distribution (pip wheel builds them)
    wheels.py stub --torch 2.13.0 --out DIR               a placeholder torch wheel + constraints
    wheels.py closure REPORT.json --have DIR              name==version of each package pip's
                                                          report installs that DIR lacks
    wheels.py manifest DIR --limit-mb 60 [--target ...]   sizes, total, DIR/manifest.json; exit 1
                                                          when over the limit

torch itself stays out: the GPU machine has a CUDA build preinstalled and CI installs the CPU
build. The resolver sees a placeholder torch with no requirements of its own, so the closure holds
what the other packages need and nothing torch brings, unless one of them asks for it too
(typing-extensions: pydantic needs a newer one than torch does).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

# Requirements of sora-train that the bench leaves out, and why (each is imported lazily, where used).
SKIPPED = {
    "torch": "preinstalled: the GPU machine's CUDA build, or the CPU build CI installs first",
    "av": "video encode/decode (synthetic corpus, shards, samples): not on the bench's path",
    "decord": "video decode: not on the bench's path (latents are made in memory)",
    "wandb": "tracking: the bench logs no run",
    "matplotlib": "sora-sweep's plot only",
    "pillow": "image inputs (image shards, sora-sample --image) only",
    "fsspec": "object-store URLs only; torch brings it anyway",
}
# Also needed: the GPU test tier (from the project's dev extra).
EXTRA_NEEDED = ("pytest",)
# Packages on PyPI as a source distribution only; pip wheel builds them (pure Python, any platform).
SOURCE_ONLY = {"deepspeed": None, "antlr4-python3-runtime": "antlr4-python3-runtime==4.9.*"}
TORCH_PLACEHOLDER = "placeholder"  # the local version label of the stub: torch==X+placeholder


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str:
    """The distribution name at the start of a requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    if not match:
        raise ValueError(f"not a requirement: {line!r}")
    return normalise(match[1])


def wheel_metadata(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode("utf-8"))
    return metadata.get_all("Requires-Dist") or []


def needed_requirements(wheel: Path) -> list[str]:
    """The project's requirements the bench needs: its base requirements less `SKIPPED`, plus
    `EXTRA_NEEDED` from its extras (markers dropped; the target is Linux and CPython >= 3.10)."""
    needed = []
    for line in wheel_metadata(wheel):
        spec, _, marker = line.partition(";")
        name = requirement_name(spec)
        in_extra = "extra ==" in marker
        if (in_extra and name in EXTRA_NEEDED) or (not in_extra and name not in SKIPPED):
            needed.append(spec.strip())
    return sorted(set(needed), key=requirement_name)


def source_only(wheel: Path) -> list[str]:
    """The requirement strings to build wheels of: the project's own spec where it names the
    package, else the pin its dependants carry."""
    project = {requirement_name(r): r for r in needed_requirements(wheel)}
    return [project.get(name) or spec or name for name, spec in SOURCE_ONLY.items()]


def platform_tags(arch: str, glibc: str) -> list[str]:
    """Every manylinux tag a machine of `arch` with glibc `glibc` (e.g. 2.36) runs, newest first."""
    major, minor = (int(part) for part in glibc.split(".")[:2])
    if major != 2:
        raise ValueError(f"unexpected glibc version {glibc!r}")
    tags = [f"manylinux_2_{n}_{arch}" for n in range(minor, 4, -1)]
    legacy = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}
    tags += [f"{name}_{arch}" for name, needs in legacy.items() if minor >= needs]
    return tags


def write_stub(torch_version: str, out: Path) -> None:
    """A placeholder torch wheel (metadata only, no requirements) and a constraints file that
    makes the resolver take it: torch is preinstalled where the wheels are used."""
    version = f"{torch_version}+{TORCH_PLACEHOLDER}"
    info = f"torch-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: bench/gpu/wheels.py\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out / f"torch-{version}-py3-none-any.whl", "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    (out / "constraints.txt").write_text(f"torch=={version}\n")


def closure(report: Path, have: Path) -> list[str]:
    """name==version of every package pip's install report lists, less torch and the packages
    whose wheel is already in `have`."""
    present = {normalise(w.name.split("-")[0]) for w in have.glob("*.whl")}
    lines = []
    for item in json.loads(report.read_text())["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if normalise(name) not in present and normalise(name) != "torch":
            lines.append(f"{name}=={version}")
    return sorted(lines, key=str.lower)


def manifest(folder: Path, limit_mb: float, target: dict[str, str]) -> int:
    """Print each wheel's size and the total, write folder/manifest.json; 1 when over `limit_mb`."""
    wheels = sorted(folder.glob("*.whl"), key=lambda w: w.name.lower())
    sizes = {w.name: w.stat().st_size for w in wheels}
    total = sum(sizes.values())
    for name, size in sizes.items():
        print(f"  {size / 1e6:8.2f} MB  {name}")
    print(f"  {total / 1e6:8.2f} MB  total, {len(wheels)} wheels (limit {limit_mb:g} MB)")
    record = {"target": target, "wheels": sizes, "total_bytes": total, "limit_mb": limit_mb,
              "skipped": SKIPPED}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(record, indent=2) + "\n")
    if total > limit_mb * 1e6:
        print(f"error: the wheels take {total / 1e6:.1f} MB, over the {limit_mb:g} MB limit", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Dispatch the subcommands listed in the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tags = sub.add_parser("platforms")
    tags.add_argument("--arch", required=True)
    tags.add_argument("--glibc", required=True)
    for name in ("requirements", "source-only"):
        sub.add_parser(name).add_argument("wheel", type=Path)
    stub = sub.add_parser("stub")
    stub.add_argument("--torch", required=True)
    stub.add_argument("--out", type=Path, required=True)
    report = sub.add_parser("closure")
    report.add_argument("report", type=Path)
    report.add_argument("--have", type=Path, required=True)
    sizes = sub.add_parser("manifest")
    sizes.add_argument("folder", type=Path)
    sizes.add_argument("--limit-mb", type=float, required=True)
    sizes.add_argument("--target", nargs="*", default=[], help="KEY=VALUE pairs recorded as the target")
    args = parser.parse_args(argv)
    if args.command == "platforms":
        print(" ".join(f"--platform {tag}" for tag in platform_tags(args.arch, args.glibc)))
    elif args.command == "requirements":
        print("\n".join(needed_requirements(args.wheel)))
    elif args.command == "source-only":
        print("\n".join(source_only(args.wheel)))
    elif args.command == "stub":
        write_stub(args.torch, args.out)
    elif args.command == "closure":
        print("\n".join(closure(args.report, args.have)))
    else:
        target = dict(pair.split("=", 1) for pair in args.target)
        return manifest(args.folder, args.limit_mb, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
