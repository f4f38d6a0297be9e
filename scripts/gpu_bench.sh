#!/usr/bin/env bash
# On the GPU machine, in one call: `mxmoe bench` (JSON + PNG under $OUT, table printed last),
# then BENCHMARKS.md rendered from that JSON into $OUT as well.
#   usage: scripts/gpu_bench.sh [mxmoe bench options]    e.g. --models 20b --time-limit 540
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv || true
PYTHONPATH=src python3 -m mxmoe.cli bench --out "$out" "$@"
rc=$?
json=$(ls -t "$out"/*.json 2>/dev/null | head -1)
if [ -n "$json" ]; then
    PYTHONPATH=src python3 scripts/render_benchmarks.py "$json" --output "$out/BENCHMARKS.md" || true
fi
exit $rc
