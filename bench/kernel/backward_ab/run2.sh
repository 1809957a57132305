#!/usr/bin/env bash
# The commands behind bench/kernel/backward_ab/run2/ (repository root as cwd; results in $OUT or there): backward GPU
# tests with the dQ pass on a second stream, the backward layout A/B (bwd_ab.py), then forward+backward against SDPA
# and FlexAttention on the same masks, head_dim 128, autotuned, FlexAttention's fwd+bwd up to 64k.
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/kernel/backward_ab/run2}
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } | tee "$out/env.txt"
PATCHATTN_AUTOTUNE=0 timeout 120 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 6 -rA \
    tests/kernels/test_blocksparse_triton.py -k "test_backward and not loop" > "$out/gpu_tests_backward.log" 2>&1
tail -1 "$out/gpu_tests_backward.log"
PATCHATTN_AUTOTUNE=0 OUT="$out" timeout 200 python3 bench/kernel/backward_ab/bwd_ab.py > "$out/bwd_ab.log" 2>&1
tail -30 "$out/bwd_ab.log"
timeout 240 python3 patchattn/bench/kernel.py --modes fwdbwd --T 16384,65536 --densities 1.0,0.5,0.1,0.02 \
    --head-dims 128 --flex-bwd-max-t 65536 --csv "$out/fwdbwd_d128.csv" --json "$out/fwdbwd_d128.json" \
    > "$out/fwdbwd_d128.log" 2>&1
tail -25 "$out/fwdbwd_d128.log"
