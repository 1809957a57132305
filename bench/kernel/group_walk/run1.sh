#!/usr/bin/env bash
# Call 1 behind bench/kernel/group_walk/ (repository root as cwd; results in $OUT or bench/kernel/group_walk/run1):
# the GPU tests of the dK/dV group walks (small cases compiled for CUDA and the full-size ones), the A/B of the split
# backward alone (group_ab.py), then fwd+bwd at 16k eagerly and graphed against Flex with the new default.
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/kernel/group_walk/run1}
mkdir -p "$out"
PATCHATTN_AUTOTUNE=0 timeout 200 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 14 -rA \
    tests/kernels/test_blocksparse_triton.py -k "group_walk" > "$out/gpu_tests_group_walks.log" 2>&1
tail -1 "$out/gpu_tests_group_walks.log"; grep -E "^(FAILED|ERROR)" "$out/gpu_tests_group_walks.log" | head -5
OUT="$out" PATCHATTN_AUTOTUNE=0 timeout 200 python3 bench/kernel/group_walk/group_ab.py > "$out/group_ab.log" 2>&1
cut -c1-150 "$out/group_ab.log" | grep -v Warn | tail -32
timeout 150 python3 bench/kernel/known_full/eager_vs_graph.py "$out/eager_vs_graph.json" > "$out/eager_vs_graph.log" 2>&1
tail -8 "$out/eager_vs_graph.log" | cut -c1-300
