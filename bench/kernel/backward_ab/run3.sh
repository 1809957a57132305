#!/usr/bin/env bash
# The commands behind bench/kernel/backward_ab/run3/ and bench/methods/h200_prefill_2026-11-29.* (repository root as
# cwd; results in $OUT or there): where a short fwd+bwd spends its time (host_fwdbwd.py), forward+backward at
# head_dim 64 against SDPA and FlexAttention (autotuned, Flex fwd+bwd up to 64k), then every sparse method's prefill
# at 32k and 128k with the current kernels (the README's prefill columns).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/kernel/backward_ab/run3}
methods_out=${METHODS_OUT:-bench/methods}
mkdir -p "$out" "$methods_out"
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } | tee "$out/env.txt"
timeout 150 python3 bench/kernel/backward_ab/host_fwdbwd.py > "$out/host_fwdbwd.log" 2>&1
head -30 "$out/host_fwdbwd.log"
timeout 240 python3 patchattn/bench/kernel.py --modes fwdbwd --T 16384,65536 --densities 1.0,0.5,0.1,0.02 \
    --head-dims 64 --flex-bwd-max-t 65536 --csv "$out/fwdbwd_d64.csv" --json "$out/fwdbwd_d64.json" \
    > "$out/fwdbwd_d64.log" 2>&1
tail -22 "$out/fwdbwd_d64.log"
timeout 200 python3 -m patchattn.bench.methods --methods 'streaming;power;s2;hip;blocktopk' --prefill 32768,131072 \
    --decode '' --csv "$methods_out/h200_prefill_2026-11-29.csv" > "$methods_out/h200_prefill_2026-11-29.log" 2>&1
tail -12 "$methods_out/h200_prefill_2026-11-29.log"
