#!/usr/bin/env bash
# Put into .whl/ every wheel bench/gpu/run.sh needs on a GPU machine that has a CUDA torch and no
# network: the project's own wheel, wheels built here for the packages that ship only source
# (DeepSpeed, antlr4-python3-runtime), and binary wheels downloaded for the target of the rest of
# the closure (the trainer without video decoding or tracking, DeepSpeed ZeRO, Hydra, einops,
# webdataset, safetensors, pytest). Not torch, nor anything only torch needs. Runs on a CPU
# machine with a network; fails when the wheels take more than LIMIT_MB.
#
# Target (defaults: this interpreter and machine):
#   PY_VERSION=3.12 ARCH=aarch64 GLIBC=2.39 bench/gpu/prepare.sh    # e.g. a GH200 node
# Other settings: PYTHON (whose pip runs), WHEELS (the folder, .whl), LIMIT_MB (60),
# TORCH_VERSION (the version the resolver takes torch to be, 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}
ARCH=${ARCH:-$(uname -m)}
GLIBC=${GLIBC:-$("$PYTHON" -c 'import platform; print(platform.libc_ver()[1] or "2.17")')}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
WHEELS=${WHEELS:-.whl}
LIMIT_MB=${LIMIT_MB:-60}

helper=bench/gpu/wheels.py
pip=("$PYTHON" -m pip)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
started=$SECONDS
echo "preparing $WHEELS for CPython $PY_VERSION on $ARCH (glibc $GLIBC)"

# pip's flags for binary wheels of the target: implementation, version and every manylinux tag.
read -r -a platforms <<<"$("$PYTHON" "$helper" platforms --arch "$ARCH" --glibc "$GLIBC")"
target=(--only-binary=:all: --implementation cp --python-version "$PY_VERSION" "${platforms[@]}")

# One version of each package: start from an empty folder.
rm -rf "$WHEELS"
mkdir -p "$WHEELS"

# 1. The project's own wheel (pure Python; its recipes ship inside it), built from a copy of the
#    sources: setuptools would package stale modules left in the tree's build/ folder.
mkdir "$work/src"
cp -r pyproject.toml README.md sora_train configs data_prep "$work/src/"
"${pip[@]}" wheel --quiet --no-deps --wheel-dir "$WHEELS" "$work/src"
project=$(ls "$WHEELS"/sora_train-*.whl)

# 2. Wheels built here for the packages published as source only (pure Python: any target).
mapfile -t sources < <("$PYTHON" "$helper" source-only "$project")
"${pip[@]}" wheel --quiet --no-deps --wheel-dir "$WHEELS" "${sources[@]}"

# 3. The closure: pip resolves what the bench needs for the target, with a placeholder torch
#    that requires nothing (torch is preinstalled where the wheels go); then the missing wheels.
mapfile -t needed < <("$PYTHON" "$helper" requirements "$project")
"$PYTHON" "$helper" stub --torch "$TORCH_VERSION" --out "$work/stub"
resolve() {
    # A dry run into a target folder: pip installs nothing, and takes the target's tags.
    "${pip[@]}" install --quiet --dry-run --target "$work/none" "${target[@]}" \
        --find-links "$WHEELS" --find-links "$work/stub" --constraint "$work/stub/constraints.txt" \
        "$@" "${needed[@]}"
}
resolve --report "$work/report.json"
mapfile -t missing < <("$PYTHON" "$helper" closure "$work/report.json" --have "$WHEELS")
if ((${#missing[@]})); then
    "${pip[@]}" download --quiet --no-deps "${target[@]}" --dest "$WHEELS" "${missing[@]}"
fi

# 4. The folder alone must satisfy every requirement (as run.sh installs it: no index).
resolve --no-index

# 5. Sizes, the total against the limit, and .whl/manifest.json (target, commit, what was skipped).
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
"$PYTHON" "$helper" manifest "$WHEELS" --limit-mb "$LIMIT_MB" \
    --target "python=$PY_VERSION" "arch=$ARCH" "glibc=$GLIBC" "commit=$commit"
echo "prepared $WHEELS in $((SECONDS - started)) s"
