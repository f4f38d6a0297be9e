#!/usr/bin/env bash
# On the GPU machine, in one call: gpt-oss-20b end to end in transformers (random MXFP4-exact
# weights made on the GPU), bf16 experts against use_mxmoe: decode tok/s at batch 1, 8, 64
# (eager, then static cache + torch.compile), prefill tok/s at 2048 and 8192, the MoE share of
# decode, memory, and greedy agreement. Writes the JSON and the log under $OUT when it is set
# (the device call's folder), else into benchmarks/results/; the table is printed last.
#   usage: scripts/gpu_e2e.sh [mxmoe bench --model-e2e options]   e.g. --e2e-quick
# --time-limit (default here 300 s of measuring) stops starting new points; a compile started
# before it runs to its end. `timeout` is the backstop: the JSON is rewritten after every point.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,memory.used \
    --format=csv || true
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton', \
triton.__version__, '| transformers', transformers.__version__)" || true
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" timeout "${E2E_TIMEOUT_S:-450}" \
    python3 -m mxmoe.cli bench --model-e2e --e2e-config 20b --out "$out" --time-limit 300 "$@" \
    2>&1 | tee "$out/e2e-20b.log"
exit "${PIPESTATUS[0]}"
