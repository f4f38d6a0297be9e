#!/usr/bin/env bash
# One device call (~560 s) that settles the host-cost questions of benchmarks/NOTES.md section 21:
#   1. scripts/host_profile_gpu.py --cupti: the calls clean, after a torch.profiler with
#      TEARDOWN_CUPTI=1 and after one with TEARDOWN_CUPTI=0 (does a finished profile slow later
#      calls, and does the teardown undo it?);
#   2. mxmoe bench's host column at decode sizes, its launch counts now releasing CUPTI
#      (each row's host_cupti_teardown says so), the layer and fused_experts;
#   3. the e2e run with the profiled points last (is mxmoe's batch-1 eager step then ~27 ms?).
# Everything under $OUT.
#   usage: MXMOE_GIT_SHA=<commit> [PYTHONPATH=.peers] scripts/gpu_host_e2e.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MXMOE_CACHE_DIR=/tmp/mxmoe-cache
out=${OUT:-/tmp/mxmoe-out}
mkdir -p "$out"
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" timeout 70 python3 scripts/host_profile_gpu.py \
    --cupti --calls 300 > "$out/host-cupti.txt" 2>&1
echo "host_profile --cupti rc=$?"; cat "$out/host-cupti.txt"
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" timeout 130 python3 -m mxmoe.cli bench \
    --models 20b 120b --tokens 1 64 --backends auto layer --tag host-teardown --out "$out" \
    --no-plot --time-limit 110 > "$out/bench-host.log" 2>&1
echo "bench rc=$?"; sed -n '/host cost/,/^$/p' "$out/bench-host.log"
E2E_TIMEOUT_S="${E2E_TIMEOUT_S:-320}" E2E_TIME_LIMIT_S="${E2E_TIME_LIMIT_S:-275}" \
    scripts/gpu_e2e.sh > "$out/e2e-stdout.txt" 2>&1
echo "e2e rc=$?"; grep -E "decode tok/s|prefill tok/s|MoE share|greedy tokens" "$out/e2e-stdout.txt"
