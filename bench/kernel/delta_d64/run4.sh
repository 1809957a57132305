#!/usr/bin/env bash
# Call 4 behind bench/kernel/delta_d64/ (repository root as cwd; results in $OUT or bench/kernel/delta_d64/run4):
# GPU tests of the backward's launch orders, then the order x dK/dV-tile A/B against Flex (order_ab.py).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/kernel/delta_d64/run4}
mkdir -p "$out"
PATCHATTN_AUTOTUNE=0 timeout 90 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 6 -rA \
    tests/kernels/test_blocksparse_triton.py -k "launch_orders" > "$out/gpu_tests_orders.log" 2>&1
tail -1 "$out/gpu_tests_orders.log"
PATCHATTN_AUTOTUNE=0 OUT="$out" timeout 420 python3 bench/kernel/delta_d64/order_ab.py > "$out/order_ab.log" 2>&1
tail -3 "$out/order_ab.log" | cut -c1-300
