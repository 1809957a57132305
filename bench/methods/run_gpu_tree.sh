#!/usr/bin/env bash
# Run 8 (bench/methods/RESULTS.md): hip's prefill tree search as one Triton kernel (kernels/blockselect/triton_tree.py,
# `fused_search`, the default on the triton backend) next to the torch rounds (`fused_search=false`), 32k and 128k,
# and hip alone at 512k (repository root as cwd; results in $OUT or bench/methods).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/methods}
mkdir -p "$out"
PATCHATTN_AUTOTUNE=0 timeout 150 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -rA \
    tests/kernels/test_blockselect.py -k tree > "$out/gpu_tests_tree_run8.log" 2>&1
tail -1 "$out/gpu_tests_tree_run8.log"
timeout 200 python3 -m patchattn.bench.methods \
    --methods 'hip@torch:{"fused_search":false};hip;hip@group:{"per_head":false}' --prefill 32768,131072 \
    --decode '' --csv "$out/h200_tree_run8.csv" > "$out/h200_tree_run8.log" 2>&1
tail -8 "$out/h200_tree_run8.log"
PATCHATTN_TREE_WARPS=8 timeout 90 python3 -m patchattn.bench.methods --methods 'hip@w8' --prefill 131072 --decode '' \
    --no-flex --csv "$out/h200_tree_w8_run8.csv" > "$out/h200_tree_w8_run8.log" 2>&1
tail -3 "$out/h200_tree_w8_run8.log"
timeout 150 python3 -m patchattn.bench.methods --methods 'hip' --prefill 524288 --decode '' --no-flex \
    --csv "$out/h200_tree_512k_run8.csv" > "$out/h200_tree_512k_run8.log" 2>&1
tail -3 "$out/h200_tree_512k_run8.log"
