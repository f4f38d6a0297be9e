#!/usr/bin/env bash
# One device call: the GPU tests, then `mxmoe bench` on both gpt-oss shapes with the peer, the
# layer (its auto layout and plain) and host-cost columns. JSONs and logs under $OUT.
#   usage: MXMOE_GIT_SHA=... PYTHONPATH=.peers scripts/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MXMOE_CACHE_DIR=/tmp/mxmoe-cache
out=${OUT:-/tmp/mxmoe-out}
mkdir -p "$out"
timeout "${PYTEST_LIMIT:-150}" python3 -m pytest -m gpu -q -p no:cacheprovider -p no:logging \
    tests > "$out/pytest-gpu.log" 2>&1
echo "pytest -m gpu rc=$?"; grep -E "passed|failed|^FAILED|^ERROR" "$out/pytest-gpu.log" | tail -8
paths=(triton_dequant auto auto@mma_lanes layer layer@plain triton_kernels)
timeout "${BENCH20_LIMIT:-170}" python3 -m mxmoe.cli bench --models 20b --tag 20b --out "$out" \
    --no-plot --backends "${paths[@]}" --tokens 1 2 4 8 16 64 128 256 512 1024 2048 4096 \
    --time-limit "$(( ${BENCH20_LIMIT:-170} - 25 ))" > "$out/bench-20b.log" 2>&1
echo "bench 20b rc=$?"
timeout "${BENCH120_LIMIT:-170}" python3 -m mxmoe.cli bench --models 120b --tag 120b --out "$out" \
    --no-plot --backends "${paths[@]}" --tokens 1 2 4 8 16 64 128 256 512 1024 2048 4096 \
    --time-limit "$(( ${BENCH120_LIMIT:-170} - 25 ))" > "$out/bench-120b.log" 2>&1
echo "bench 120b rc=$?"
for f in "$out"/bench-20b.log "$out"/bench-120b.log; do sed -n '/^gpt-oss/,$p' "$f" | grep -v "^\[" ; done
