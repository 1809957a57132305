#!/usr/bin/env bash
# Call 6 behind bench/kernel/delta_d64/ (repository root as cwd; log in $OUT or bench/kernel/delta_d64): the
# backward's GPU tests (small cases compiled for CUDA and full-size ones) with this session's defaults.
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=. PATCHATTN_AUTOTUNE=0
out=${OUT:-bench/kernel/delta_d64}
timeout 420 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 8 -rA tests/kernels/test_blocksparse_triton.py \
    -k "backward or delta or launch_orders or fused_dq" > "$out/gpu_tests_backward_final.log" 2>&1
tail -1 "$out/gpu_tests_backward_final.log"
grep -cE "^PASSED" "$out/gpu_tests_backward_final.log"; grep -E "^(FAILED|ERROR)" "$out/gpu_tests_backward_final.log" | head
