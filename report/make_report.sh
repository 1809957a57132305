#!/usr/bin/env bash
# Regenerates everything in report/: SmolLM2-135M-Instruct on CPU, offline tasks through lm-eval, 6 methods
# (vartrack is left out: dense SmolLM2 scores 0.05 on it; add methods or tasks freely: finished cells are kept). About 50 minutes on a busy 2-core CPU.
# Resumable: cells already in report/smollm2.json are skipped (delete it or pass --fresh to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
patchattn eval --model smollm2 --methods dense,blocktopk,hip,streaming,moa,duo --tasks passkey,needle,ppl \
    --lengths 1024,2048 --depths 0.1,0.5,0.9 --blocks-length 2048 \
    --json report/smollm2.json --csv report/smollm2.csv
patchattn report report/smollm2.json --out report/
