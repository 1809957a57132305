#!/usr/bin/env bash
# Gemma-3-270M at 8k for every training-free method (CPU): the second architecture of issue 4, with passkeys.
# 1. retrieval-head scores for Gemma-3-270M (duo's shipped scores are found by architecture signature);
# 2. dense and the methods the first Gemma sweep (gemma3-270m.json) lacked: perplexity and passkey at 8k (gemma3-270m_new.json);
# 3. passkey at 8k for the four methods that file already had (their 8k perplexity stays as measured there; dense's
#    passkey comes from step 2) -> gemma3-270m_passkey.json.
set -euo pipefail
LOG=bench/quality/gemma3-270m_all.log
python3 -m patchattn.calibrate.retrieval_heads --model gemma3-270m --out patchattn/calibrate/plans/gemma3-270m_retrieval.json 2>&1 \
  | grep --line-buffered -v "GGUF\|Loading weights" | tee -a $LOG
python3 -m patchattn.bench.quality --model gemma3-270m --resume \
  --methods 'dense;power;s2;moa;hyper;duo' --ppl-lengths 8192 --passkey-lengths 8192 --depths 0.1,0.5,0.9 \
  --json bench/quality/gemma3-270m_new.json 2>&1 | grep --line-buffered -v "GGUF\|Loading weights" | tee -a $LOG
python3 -m patchattn.bench.quality --model gemma3-270m --resume \
  --methods 'streaming;blocktopk@top14:{"top_k":14,"mass":1.0};hip;blocktopk' --ppl-lengths "" \
  --passkey-lengths 8192 --depths 0.1,0.5,0.9 \
  --json bench/quality/gemma3-270m_passkey.json 2>&1 | grep --line-buffered -v "GGUF\|Loading weights" | tee -a $LOG
