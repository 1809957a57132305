#!/usr/bin/env bash
# Programmatic dependent launch of the decode-step kernels (PATCHATTN_PDL), on the H200 (repository root as cwd;
# results in $OUT or bench/decode/pdl/run1): the decode/selection tests with PDL on (the small ones compiled for CUDA,
# graph replays included), then the methods' decode steps at 128k, batch 1, 1 and 8 layers per CUDA graph, PDL off
# and on, side by side.
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/decode/pdl/run1}
mkdir -p "$out"
PATCHATTN_AUTOTUNE=0 timeout 75 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 14 -rA \
    tests/kernels/test_blocksparse_triton.py tests/kernels/test_blockselect.py -k "(decode or select or graph) and not large" \
    > "$out/gpu_tests_pdl.log" 2>&1
tail -1 "$out/gpu_tests_pdl.log"; grep -E "^(FAILED|ERROR)" "$out/gpu_tests_pdl.log" | head -5
for L in 1 8; do
  for pdl in 0 1; do
    PATCHATTN_PDL=$pdl timeout 60 python3 -m patchattn.bench.methods --methods 'blocktopk;hip' --prefill "" \
        --decode 131072 --decode-batch 1 --decode-layers $L --csv "$out/methods_l${L}_pdl$pdl.csv" \
        > "$out/methods_l${L}_pdl$pdl.log" 2>&1
    echo "L=$L PDL=$pdl"; grep -o '"method": "[a-z]*".*"graph_ms": [0-9.]*' "$out/methods_l${L}_pdl$pdl.log" | sed 's/"density.*"total_ms"/ total/' | cut -c1-160
  done
done
