#!/usr/bin/env bash
# Issue 9's GPU proof in one device call: memcheck over each Triton backend (one bounded run
# each, so that a slow one cannot hide the others' ERROR SUMMARY) and the large-M case
# (M*k*2I > 2**31) without the sanitizer. Logs under $OUT.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1 MXMOE_CACHE_DIR=/tmp/mxmoe-cache
out=${OUT:-/tmp/mxmoe-out}
mkdir -p "$out"
for backend in triton_dequant triton_scaled bf16; do
    echo "=== memcheck $backend"
    OUT="$out" timeout "${SANITIZE_LIMIT:-170}" bash scripts/sanitize.sh --backends "$backend" \
        --json "$out/sanitize-$backend.json" >/dev/null 2>&1
    echo "rc=$?"
    mv "$out/sanitize.log" "$out/sanitize-$backend.log" 2>/dev/null
    grep -a -c "^ok " "$out/sanitize-$backend.log"; grep -a -E "^(FAIL|ERR)" "$out/sanitize-$backend.log" | head
    grep -a "ERROR SUMMARY" "$out/sanitize-$backend.log" | tail -n 1
done
echo "=== large M (no sanitizer)"
timeout "${LARGE_LIMIT:-120}" python3 scripts/sanitize.py --large --json "$out/sanitize-large.json" \
    2>&1 | tee "$out/sanitize-large.log" | tail -n 8
echo "rc=${PIPESTATUS[0]}"
