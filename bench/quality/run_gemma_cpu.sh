#!/usr/bin/env bash
# The command behind bench/quality/gemma3-270m.json: the 8k numbers repeated on a second architecture (CPU).
set -euo pipefail
python3 -m patchattn.bench.quality --model gemma3-270m \
  --methods "dense;streaming;blocktopk;hip" \
  --ppl-lengths 8192 --passkey-lengths "" --depths 0.5 \
  --json bench/quality/gemma3-270m.json 2>&1 | grep --line-buffered -v "GGUF\|Loading weights" | tee bench/quality/gemma3-270m.log
