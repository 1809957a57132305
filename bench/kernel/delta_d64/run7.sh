#!/usr/bin/env bash
# Call 7 behind bench/kernel/delta_d64/ (repository root as cwd; results in $OUT or bench/kernel/delta_d64/run7):
# GPU tests of the dK/dV pass's three walks, then their A/B (walk_ab.py).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=. PATCHATTN_AUTOTUNE=0
out=${OUT:-bench/kernel/delta_d64/run7}
mkdir -p "$out"
timeout 100 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 8 -rA \
    tests/kernels/test_blocksparse_triton.py -k "dkdv_walks" > "$out/gpu_tests_walks.log" 2>&1
tail -1 "$out/gpu_tests_walks.log"
OUT="$out" timeout 300 python3 bench/kernel/delta_d64/walk_ab.py > "$out/walk_ab.log" 2>&1
tail -2 "$out/walk_ab.log" | cut -c1-200
