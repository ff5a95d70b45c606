#!/usr/bin/env bash
# CI for bench/gpu: the CPU smoke mode of the GPU path in a clean venv that holds only the CPU
# build of torch and the wheels prepare.sh makes, installed without an index. Fails when the
# wheels miss a package the trainer, the bench or the GPU tests import, when they exceed their
# size limit, or when a step fails. Nothing here touches .whl/ or bench/gpu/out/ (OUT=DIR keeps
# the results there).
set -euo pipefail
cd "$(dirname "$0")/../.."

started=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A fresh venv with torch alone (the CPU build, as .ci/run installs it).
python3 -m venv "$work/venv"
venv_python=$work/venv/bin/python
"$venv_python" -m pip install --quiet torch==2.13.0
echo "clean venv with torch ready in $((SECONDS - started)) s"

# The wheels for this interpreter and machine, then every step at tiny sizes from them alone.
PYTHON=$venv_python WHEELS=$work/wheels bash bench/gpu/prepare.sh
DEVICE=cpu PYTHON=$venv_python WHEELS=$work/wheels OUT=${OUT:-$work/out} bash bench/gpu/run.sh
echo "bench/gpu CI check passed in $((SECONDS - started)) s"
