#!/usr/bin/env bash
# Nsight Compute over the two grouped GEMMs of one decode step (gpt-oss-20b shape), to see what
# limits them: DRAM throughput, issue slots, stall reasons, instruction mix. Clocks untouched.
#   scripts/ncu_decode.sh [tokens]      (report text in $OUT/ncu-decode-M<tokens>.txt)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src MXMOE_CACHE_DIR=/tmp/mxmoe-cache
m=${1:-1}
out=${OUT:-/tmp/mxmoe-out}
mkdir -p "$out"
ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)
"$ncu" --clock-control none --kernel-name regex:moe_gemm --launch-skip 6 --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section InstructionStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    python3 scripts/profile_layer.py --tokens "$m" --backend "${BACKEND:-triton_dequant}" \
    > "$out/ncu-decode-M$m.txt" 2>&1
echo "ncu rc=$?"
grep -E "moe_gemm|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Issue Slots Busy|Executed Ipc A|Achieved Occupancy|Registers Per|Grid Size|Block Size|Theoretical Occ|Warp Cycles Per Issued|Stall" \
    "$out/ncu-decode-M$m.txt" | head -n 60
