#!/usr/bin/env bash
# One device call: the GPU tests, then `mxmoe bench` at decode sizes with host-cost columns
# (mxmoe paths, the MXFP4MoE layer and triton_kernels when .peers is on PYTHONPATH).
#   usage: MXMOE_GIT_SHA=... scripts/gpu_host.sh [extra mxmoe bench options]
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MXMOE_CACHE_DIR=/tmp/mxmoe-cache
out=${OUT:-/tmp/mxmoe-out}
mkdir -p "$out"
timeout "${PYTEST_LIMIT:-200}" python3 -m pytest -m gpu -q -p no:cacheprovider -x tests \
    > "$out/pytest-gpu.log" 2>&1
echo "pytest -m gpu rc=$?"; tail -5 "$out/pytest-gpu.log"
timeout "${BENCH_LIMIT:-300}" python3 -m mxmoe.cli bench --out "$out" --no-plot "$@"
echo "bench rc=$?"
