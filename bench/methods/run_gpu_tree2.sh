#!/usr/bin/env bash
# Run 10 (bench/methods/RESULTS.md): hip's tree-search kernel with bf16 products and no pipelining (20 KB of shared
# memory a program instead of 65 KB): GPU tests, the launch-shape sweep (tree_tune.py), hip at 32k/128k with Flex and
# at 512k (repository root as cwd; results in $OUT or bench/methods).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/methods}
mkdir -p "$out"
PATCHATTN_AUTOTUNE=0 timeout 100 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -rA \
    tests/kernels/test_blockselect.py -k "tree" > "$out/gpu_tests_tree_run10.log" 2>&1
tail -1 "$out/gpu_tests_tree_run10.log"
LOG=tree_tune_run2 OUT="$out" bash bench/methods/run_gpu_tree_tune.sh
timeout 150 python3 -m patchattn.bench.methods --methods 'hip;hip@group:{"per_head":false}' \
    --prefill 32768,131072 --decode '' --csv "$out/h200_tree_run10.csv" > "$out/h200_tree_run10.log" 2>&1
tail -6 "$out/h200_tree_run10.log"
timeout 120 python3 -m patchattn.bench.methods --methods 'hip' --prefill 524288 --decode '' --no-flex \
    --csv "$out/h200_tree_512k_run10.csv" > "$out/h200_tree_512k_run10.log" 2>&1
tail -3 "$out/h200_tree_512k_run10.log"
