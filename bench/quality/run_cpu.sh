#!/usr/bin/env bash
# The command behind bench/quality/smollm2.json (CPU, about 1.5 hours on 2 cores; --resume skips rows already there).
# 'blocktopk@top14' and 'blocktopk@b32' are the fixed-budget variants the adaptive default is compared with.
set -euo pipefail
python3 -m patchattn.bench.quality --model smollm2 --resume \
  --methods 'dense;streaming;power;s2;blocktopk@top14:{"top_k":14,"mass":1.0};blocktopk@b32:{"block_size":32,"top_k":30,"mass":1.0};hip;moa;duo;hyper;blocktopk' \
  --ppl-lengths 4096,8192 --passkey-lengths 2048,4096,8192 --depths 0.1,0.5,0.9 \
  --json bench/quality/smollm2.json 2>&1 | grep --line-buffered -v "GGUF\|Loading weights" | tee -a bench/quality/smollm2.log
