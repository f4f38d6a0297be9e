#!/usr/bin/env bash
# On the GPU machine, in one call: `mxmoe bench` (JSON + PNG, table printed last), then
# BENCHMARKS.md rendered from that JSON beside it. Writes under $OUT when it is set (the device
# call's folder), else into the checkout's benchmarks/results/ (the committed results).
#   usage: scripts/gpu_bench.sh [mxmoe bench options]    e.g. --models 20b --time-limit 540
# The triton_kernels comparison path is used when it imports: put its folder on PYTHONPATH
# (e.g. PYTHONPATH=.peers, with .peers/triton_kernels carried to the machine).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${OUT:-}" ]; then
    out="$OUT"
    where=(--out "$out")
else
    out=benchmarks/results
    where=(--committed)
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv || true
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" python3 -m mxmoe.cli bench "${where[@]}" "$@"
rc=$?
json=$(ls -t "$out"/*.json 2>/dev/null | head -1)
if [ -n "$json" ]; then
    PYTHONPATH=src python3 scripts/render_benchmarks.py "$json" --output "$out/BENCHMARKS.md" || true
fi
exit $rc
