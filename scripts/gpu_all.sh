#!/usr/bin/env bash
# Every GPU check of the project in one device call (10 minutes), in order of priority, each
# step bounded so that a slow one cannot starve the rest. Outputs under $OUT (at most 8 files):
# the two benchmark JSONs and plots, the sanitizer log, the 1-GPU parallel run, and all.log.
set -u
cd "$(dirname "$0")/.."
# The device machine gets the tree without .git: pass the commit as MXMOE_GIT_SHA=$(git rev-parse --short HEAD).
export PYTHONPATH=src PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_DISABLE_NVLS=1 MXMOE_CACHE_DIR=/tmp/mxmoe-cache
out=${OUT:-/tmp/mxmoe-out}
mkdir -p "$out"
log="$out/all.log"
step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "=== $name rc=$?" | tee -a "$log"
}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv >>"$log" 2>&1
paths=(triton_dequant triton_scaled bf16 auto baseline)
step bench-20b "${BENCH20_LIMIT:-230}" python3 -m mxmoe.cli bench --models 20b --tag 20b \
    --out "$out" --time-limit "$(( ${BENCH20_LIMIT:-230} - 20 ))" --backends "${paths[@]}"
step bench-120b "${BENCH120_LIMIT:-150}" python3 -m mxmoe.cli bench --models 120b --tag 120b \
    --out "$out" --time-limit "$(( ${BENCH120_LIMIT:-150} - 20 ))" --backends "${paths[@]}" \
    --tokens 1 4 16 64 256 1024 4096 16384
step sanitize "${SANITIZE_LIMIT:-70}" bash scripts/sanitize.sh
step pytest-gpu "${PYTEST_LIMIT:-100}" python3 -m pytest -m gpu -q -p no:cacheprovider -rA tests
step info 40 python3 -m mxmoe.cli info
step multi-gpu-1 40 python3 scripts/multi_gpu.py --out "$out/multi_gpu_1gpu.json"
grep -E "^=== " "$log"
