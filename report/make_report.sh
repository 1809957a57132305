#!/usr/bin/env bash
# Regenerates everything in report/: SmolLM2-135M-Instruct on CPU, offline tasks through lm-eval, 6 methods
# (vartrack is left out: dense SmolLM2 scores 0.05 on it; add methods or tasks freely). About 50 minutes on a busy 2-core CPU.
# A fresh run by default, so every cell comes from one code version (RESUME=1 keeps the finished cells of
# report/smollm2.json instead). Stamped: the JSON's "environment" (versions, device, lm_eval); not the commit.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
fresh=(--fresh)
[ -z "${RESUME:-}" ] || fresh=()
patchattn eval "${fresh[@]}" --model smollm2 --methods dense,blocktopk,hip,streaming,moa,duo --tasks passkey,needle,ppl \
    --lengths 1024,2048 --depths 0.1,0.5,0.9 --blocks-length 2048 \
    --json report/smollm2.json --csv report/smollm2.csv
patchattn report report/smollm2.json --out report/
