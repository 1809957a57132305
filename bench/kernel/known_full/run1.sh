#!/usr/bin/env bash
# Call 1 behind bench/kernel/known_full/ (repository root as cwd; results in $OUT or bench/kernel/known_full):
# the dense-path tests on CUDA, the full causal block set at 4k and 16k through `patchattn bench kernel`
# (lists from causal_blocks, now known full without a host check), and hip-attn beside our hip.
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/kernel/known_full}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/env.txt"
PATCHATTN_AUTOTUNE=0 timeout 240 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 8 -rA \
    tests/kernels/test_blocksparse_triton.py -k "full_block_set or known_full or list_memo or sdpa or dense" \
    > "$out/gpu_tests_dense_path.log" 2>&1
tail -1 "$out/gpu_tests_dense_path.log"
timeout 200 python3 -m patchattn.bench.kernel --modes fwd,fwdbwd --T 4096,16384 --densities 1.0 --head-dims 128,64 \
    --csv "$out/dense_4k16k.csv" --json "$out/dense_4k16k.json" > "$out/dense_4k16k.log" 2>&1
grep -E "sdpa|ours" "$out/dense_4k16k.log" | head -30
timeout 280 python3 bench/methods/hip_attn_peer.py .whl/hip_attn-1.2.9-py3-none-any.whl --T 32768,131072 \
    --json "$out/hip_attn_peer.json" > "$out/hip_attn_peer.log" 2>&1
grep -v "^ " "$out/hip_attn_peer.log" | tail -8
