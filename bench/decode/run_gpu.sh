#!/usr/bin/env bash
# The commands behind bench/decode/: decode steps of the sparse methods (selection + kernel, eager and CUDA-graphed)
# at 128k keys, and the split-K decode kernel on random 5% lists with 1-8 programs per SM (repository root as cwd).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/decode}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
python3 -m patchattn.bench.methods --methods 'streaming;power;s2;blocktopk;hip;blocktopk@group:{"per_head":false}' \
    --prefill "" --decode 131072 --decode-batch 1,8 --csv "$out/methods_decode.csv" 2>&1 | tee "$out/methods_decode.log"
for p in 1 2 4 8; do
    PATCHATTN_DECODE_PROGRAMS_PER_SM=$p python3 patchattn/bench/kernel.py --modes decode --decode-T 131072 \
        --decode-batches 1,8 --decode-densities 0.05 --head-dims 128 --no-flex \
        --csv "$out/kernel_pps$p.csv" --json "$out/kernel_pps$p.json" 2>&1 | tee "$out/kernel_pps$p.log"
done
# One-launch decode kernel vs the separate merge kernel; where a blocktopk step's time goes.
for m in fused separate; do
    PATCHATTN_DECODE_MERGE=$m python3 patchattn/bench/kernel.py --modes decode --decode-T 131072 --decode-batches 1,8 \
        --decode-densities 0.05 --head-dims 128 --no-flex --csv "$out/kernel_merge_$m.csv" --json "$out/kernel_merge_$m.json"
done
python3 bench/decode/breakdown.py --csv "$out/breakdown_run7.csv"
python3 bench/decode/profile_step.py > "$out/profile_step.log"
python3 bench/decode/profile_step.py --warps > "$out/profile_precision.log"
