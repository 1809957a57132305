#!/usr/bin/env bash
# The commands behind bench/kernel/backward_ab/run1/ (repository root as cwd; results in $OUT or bench/kernel/backward_ab/run1):
# the backward GPU tests (every backward mode, the TMA dQ reduction included), then the backward alone in its three
# forms side by side (split dQ pass; fused dQ by TMA tile reductions; fused dQ by element-wise atomics) next to
# SDPA's and FlexAttention's backward, head_dim 128 and 64, the first fitting config for ours (no autotuning).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/kernel/backward_ab/run1}
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } | tee "$out/env.txt"
PATCHATTN_AUTOTUNE=0 timeout 240 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 6 -rA \
    tests/kernels/test_blocksparse_triton.py -k "backward or tma" > "$out/gpu_tests_backward.log" 2>&1
tail -3 "$out/gpu_tests_backward.log"
PATCHATTN_AUTOTUNE=0 timeout 300 python3 patchattn/bench/kernel.py --modes bwd --T 16384,65536 \
    --densities 1.0,0.5,0.1,0.02 --head-dims 128,64 --csv "$out/bwd_modes.csv" --json "$out/bwd_modes.json" \
    > "$out/bwd_modes.log" 2>&1
tail -40 "$out/bwd_modes.log"
