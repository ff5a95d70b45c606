#!/usr/bin/env bash
# The GPU path in one command, on a machine with a CUDA torch preinstalled and no network:
# install the wheels prepare.sh put into .whl/ (offline, into a folder of their own, so the
# preinstalled torch is used), then run four steps, each under its own time limit and each
# writing its JSON into $OUT:
#   (a) environment.json  versions, device, which SDPA kernel each attention pattern runs
#   (b) attention.json    attention TFLOP/s per kernel at 8k/32k/64k tokens, checked against fp32
#   (c) mfu.json          MFU and peak memory of the 2B preset at 32,760 tokens, top kernels
#   (d) gpu_tests.json    the GPU test tier (pytest -m gpu)
# then summary.json and a table. The GPU limits add up to 7.4 minutes, the install not counted
# (seconds). Output also goes to $OUT/run.log. Exit status 1 when a step failed.
#
#   bench/gpu/run.sh                  # on the GPU machine
#   DEVICE=cpu bench/gpu/run.sh       # the CPU smoke mode: the same steps at tiny sizes
# Settings: DEVICE (cuda), OUT (bench/gpu/out), PYTHON (python3), WHEELS (.whl),
# INSTALL (1; 0 uses the interpreter's own packages).
set -euo pipefail
cd "$(dirname "$0")/../.."

DEVICE=${DEVICE:-cuda}
OUT=${OUT:-bench/gpu/out}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
INSTALL=${INSTALL:-1}
export WHEELS PYTHONUNBUFFERED=1

# Seconds each step may take: on a GPU 445 in all, so the whole run stays under 8 minutes.
declare -A LIMIT
if [[ $DEVICE == cuda ]]; then
    LIMIT=([environment]=45 [attention]=110 [mfu]=190 [gpu_tests]=100)
else
    LIMIT=([environment]=60 [attention]=60 [mfu]=120 [gpu_tests]=60)
fi

install_wheels() {
    # Every wheel, no dependency resolution and no index: the folder holds the closure, and
    # torch (which DeepSpeed requires) is the machine's own. A fresh folder each run.
    local site wanted running
    wanted=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["target"]["python"])' \
        "$WHEELS/manifest.json")
    running=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [[ $wanted != "$running" ]]; then
        echo "error: $WHEELS holds wheels for Python $wanted, this is $running: run PY_VERSION=$running bench/gpu/prepare.sh" >&2
        return 1
    fi
    site=$(mktemp -d)/site
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed $(find "$WHEELS" -type f -name '*.whl' | wc -l) wheels from $WHEELS into $site"
}

run_step() {
    # run_step NAME SCRIPT [ARGS...]: the step under its limit; a step that was stopped or died
    # before writing its JSON gets one saying so.
    local name=$1 script=$2 status=0
    shift 2
    echo "== $name (limit ${LIMIT[$name]} s)"
    timeout --kill-after=10 "${LIMIT[$name]}" "$PYTHON" "bench/gpu/$script" \
        --device "$DEVICE" --out "$OUT/$name.json" "$@" || status=$?
    if ((status)) && [[ ! -s $OUT/$name.json || $status -ge 124 ]]; then
        printf '{"step": "%s", "status": "failed", "error": "exit status %d (124: over its %d s limit)"}\n' \
            "$name" "$status" "${LIMIT[$name]}" >"$OUT/$name.json"
    fi
}

main() {
    local started=$SECONDS
    echo "bench/gpu: DEVICE=$DEVICE OUT=$OUT PYTHON=$PYTHON ($("$PYTHON" --version 2>&1))"
    if ((INSTALL)); then
        install_wheels
    fi
    rm -f "$OUT"/{environment,attention,mfu,gpu_tests,summary}.json
    run_step environment environment.py
    run_step attention attention_bench.py
    run_step mfu mfu.py
    # pytest stops 15 s before the step's limit, so the step still writes its JSON.
    run_step gpu_tests gpu_tier.py --timeout $((LIMIT[gpu_tests] - 15))
    echo "== summary (all steps: $((SECONDS - started)) s)"
    "$PYTHON" bench/gpu/summary.py --out "$OUT"
}

mkdir -p "$OUT"
main 2>&1 | tee "$OUT/run.log"
