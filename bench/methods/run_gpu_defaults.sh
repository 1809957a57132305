#!/usr/bin/env bash
# The command behind bench/methods/h200_defaults.csv: the current defaults of hip (best-row segment scores) and
# blocktopk (adaptive mass budget), and hip's earlier mean-query search, on the H200 (repository root as cwd).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0
out=${OUT:-bench/methods}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
python3 -m patchattn.bench.methods --methods 'hip;hip@mean:{"score":"mean"};blocktopk' \
    --prefill 32768,131072 --decode 131072 --decode-batch 1,8 --csv "$out/h200_defaults.csv" 2>&1 | tee "$out/h200_defaults.log"
