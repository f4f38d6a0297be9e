#!/usr/bin/env bash
# compute-sanitizer memcheck over scripts/sanitize.py (the Triton backends at awkward shapes).
#
#   scripts/sanitize.sh [sanitize.py arguments]      # e.g. --cases M=1 --backends bf16
#
# The log goes to $OUT/sanitize.log when OUT is set, else ./sanitize.log; the last line printed
# is memcheck's ERROR SUMMARY. Exit status: memcheck's (3 on memory errors), else sanitize.py's.
# Environment: COMPUTE_SANITIZER (path), SANITIZER_FLAGS (extra memcheck flags).
set -uo pipefail
cd "$(dirname "$0")/.."

sanitizer=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || true)}
if [ -z "$sanitizer" ]; then
    for candidate in "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer \
                     /usr/local/cuda*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer; do
        if [ -x "$candidate" ]; then sanitizer=$candidate; break; fi
    done
fi
if [ -z "$sanitizer" ] || [ ! -x "$sanitizer" ]; then
    echo "compute-sanitizer not found: put it on PATH or set COMPUTE_SANITIZER" >&2
    exit 2
fi

log="${OUT:-.}/sanitize.log"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
# Every tensor its own cudaMalloc: inside the caching allocator's pooled blocks an
# out-of-bounds read lands in memory that is allocated, and memcheck cannot see it.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
export MXMOE_POISON=1
unset MXMOE_VALIDATE

# API errors are left out of the count: PyTorch and Triton make CUDA calls that fail on purpose
# (queries of not-ready events, probes); the subject here is memory accesses by the kernels.
"$sanitizer" --tool memcheck --report-api-errors no --error-exitcode 3 ${SANITIZER_FLAGS:-} \
    python3 scripts/sanitize.py "$@" 2>&1 | tee "$log"
status=$?
echo "log: $log"
grep -a "ERROR SUMMARY" "$log" | tail -n 1
exit $status
