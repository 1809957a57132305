#!/usr/bin/env bash
# Call 2 behind bench/kernel/known_full/ (repository root as cwd; results in $OUT or bench/kernel/known_full):
# the full causal block set at 4k through `patchattn bench kernel` (call 1 had expanded causal_blocks' lists per
# head, new tensors without the "known full" mark, so at 4k the kernel ran), and hip-attn beside our hip with all
# three Triton 3.6 shims (call 1 had only the first).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/kernel/known_full}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/env.txt"
timeout 200 python3 -m patchattn.bench.kernel --modes fwd,fwdbwd --T 4096 --densities 1.0 --head-dims 128,64 \
    --csv "$out/dense_4k.csv" --json "$out/dense_4k.json" > "$out/dense_4k.log" 2>&1
grep -E '"(sdpa|ours|ours_kernel|flex)"' "$out/dense_4k.log" | cut -c1-260
timeout 300 python3 bench/methods/hip_attn_peer.py .whl/hip_attn-1.2.9-py3-none-any.whl --T 32768,131072 \
    --json "$out/hip_attn_peer2.json" > "$out/hip_attn_peer2.log" 2>&1
grep -v "^ " "$out/hip_attn_peer2.log" | tail -12 | cut -c1-1500
