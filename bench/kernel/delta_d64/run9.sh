#!/usr/bin/env bash
# Call 9 behind bench/kernel/delta_d64/ (repository root as cwd; log in $OUT or bench/kernel/delta_d64): the GPU tests
# of this session's backward changes with the final defaults (dK/dV walks, launch orders, delta sources).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=. PATCHATTN_AUTOTUNE=0
out=${OUT:-bench/kernel/delta_d64}
timeout 300 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 12 -rA tests/kernels/test_blocksparse_triton.py \
    -k "dkdv_walks or launch_orders or delta_sources" > "$out/gpu_tests_session_final.log" 2>&1
tail -1 "$out/gpu_tests_session_final.log"; grep -E "^(FAILED|ERROR)" "$out/gpu_tests_session_final.log" | head
