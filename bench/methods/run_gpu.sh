#!/usr/bin/env bash
# The command behind bench/methods/*.csv (run on the H200 through the device tool, repository root as cwd).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0
out=${OUT:-bench/methods}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
METHODS='streaming;power;s2;hip;blocktopk;blocktopk@b64h:{"per_head":true,"top_k":14};blocktopk@b32h:{"block_size":32,"per_head":true,"top_k":30};blocktopk@mean:{"score":"mean"}'
python3 -m patchattn.bench.methods --methods "$METHODS" --prefill 32768,131072 --decode 131072 --decode-batch 1,8 \
    --csv "$out/h200.csv" 2>&1 | tee "$out/h200.log"
python3 -m patchattn.bench.methods --methods 'streaming;hip;blocktopk;blocktopk@b64h:{"per_head":true,"top_k":14}' \
    --prefill 524288 --decode '' --no-flex --csv "$out/h200_512k.csv" 2>&1 | tee "$out/h200_512k.log"
