#!/usr/bin/env bash
# On the GPU machine, in one call: gpt-oss-20b end to end in transformers (random MXFP4-exact
# weights made on the GPU), bf16 experts against use_mxmoe: greedy agreement and the per-layer
# divergence diagnosis, decode tok/s at batch 1, 8, 64 (128 new tokens after 128, eager), prefill
# tok/s at 2048 and 8192, the MoE share of decode (profiler), then the static cache +
# torch.compile decode points as the time budget allows; memory of the experts and of the run.
# Writes the JSON and the log under $OUT when it is set (the device call's folder), else into
# benchmarks/results/; the table is printed last.
#
#   usage: MXMOE_GIT_SHA=<commit> scripts/gpu_e2e.sh [mxmoe bench --model-e2e options]
#          E2E_CONFIG=120b MXMOE_GIT_SHA=<commit> scripts/gpu_e2e.sh   (mxmoe only)
#   MXMOE_GIT_SHA: the commit the JSON records (the device copy has no .git).
#
# Time: the whole call is meant to end within ~420 s. --time-limit (E2E_TIME_LIMIT_S, 360 s of
# measuring after the imports) stops starting points, and a compiled point starts only when its
# estimate fits; `timeout` (E2E_TIMEOUT_S, 405 s) is the backstop: its SIGTERM ends the run
# cleanly (the point under way and the rest recorded as skipped, the JSON written), SIGKILL 10 s
# later if that hangs. The JSON is rewritten after every point either way.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
config="${E2E_CONFIG:-20b}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export MXMOE_CACHE_DIR="${MXMOE_CACHE_DIR:-/tmp/mxmoe-cache}"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,memory.used \
    --format=csv || true
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" timeout -k 10 "${E2E_TIMEOUT_S:-405}" \
    python3 -m mxmoe.cli bench --model-e2e --e2e-config "$config" --out "$out" \
    --time-limit "${E2E_TIME_LIMIT_S:-360}" "$@" 2>&1 | tee "$out/e2e-$config.log"
exit "${PIPESTATUS[0]}"
