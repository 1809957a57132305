#!/usr/bin/env bash
# The command behind bench/quality/gemma3-270m.json: the 8k numbers repeated on a second architecture (CPU).
# It ran when blocktopk's default was the fixed top-14 (the row is labelled so); the adaptive default was added later with --resume.
set -euo pipefail
python3 -m patchattn.bench.quality --model gemma3-270m --resume \
  --methods 'dense;streaming;blocktopk@top14:{"top_k":14,"mass":1.0};hip;blocktopk' \
  --ppl-lengths 8192 --passkey-lengths "" --depths 0.5 \
  --json bench/quality/gemma3-270m.json 2>&1 | grep --line-buffered -v "GGUF\|Loading weights" | tee -a bench/quality/gemma3-270m.log
