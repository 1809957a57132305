#!/usr/bin/env bash
# Run 11 (bench/methods/RESULTS.md): blocktopk's prefill choice straight from its scores to block lists in one Triton
# program per query block (`fused_select`, the default on the triton backend) next to the torch top-k + masks +
# lists (`fused_select=false`), 128k (repository root as cwd; results in $OUT or bench/methods).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/methods}
mkdir -p "$out"
PATCHATTN_AUTOTUNE=0 timeout 60 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -rA \
    tests/kernels/test_blockselect.py -k "select_kernel or fused_scores or decode_lists_match" \
    > "$out/gpu_tests_select_run11.log" 2>&1
tail -1 "$out/gpu_tests_select_run11.log"
timeout 120 python3 -m patchattn.bench.methods --methods 'blocktopk@masks:{"fused_select":false};blocktopk' \
    --prefill 131072 --decode '' --csv "$out/h200_select_run11.csv" > "$out/h200_select_run11.log" 2>&1
tail -4 "$out/h200_select_run11.log"
