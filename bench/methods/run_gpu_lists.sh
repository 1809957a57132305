#!/usr/bin/env bash
# Run 9 (bench/methods/RESULTS.md): the dynamic methods' prefill after block masks became lists by a prefix-sum kernel
# (kernels/blocksparse/triton_lists.py) instead of a sort, with hip's fused tree search; 32k, 128k and 512k
# (repository root as cwd; results in $OUT or bench/methods).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/methods}
mkdir -p "$out"
PATCHATTN_AUTOTUNE=0 timeout 120 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -rA \
    tests/kernels/test_blockselect.py tests/kernels/test_blocksparse_triton.py -k "tree or mask_to_lists or prefill" \
    > "$out/gpu_tests_lists.log" 2>&1
tail -1 "$out/gpu_tests_lists.log"
timeout 200 python3 -m patchattn.bench.methods \
    --methods 'hip@torch:{"fused_search":false};hip;hip@group:{"per_head":false};blocktopk;streaming' \
    --prefill 32768,131072 --decode '' --csv "$out/h200_lists.csv" > "$out/h200_lists.log" 2>&1
tail -12 "$out/h200_lists.log"
timeout 200 python3 -m patchattn.bench.methods --methods 'hip;blocktopk;streaming' --prefill 524288 --decode '' \
    --no-flex --csv "$out/h200_lists_512k.csv" > "$out/h200_lists_512k.log" 2>&1
tail -5 "$out/h200_lists_512k.log"
