#!/usr/bin/env bash
# The command behind bench/quality/smollm2.json (CPU, about an hour on 2 cores).
set -euo pipefail
python3 -m patchattn.bench.quality --model smollm2 \
  --methods 'dense;streaming;power;s2;blocktopk;blocktopk@b32:{"block_size":32,"top_k":30};hip;moa;duo;hyper' \
  --ppl-lengths 4096,8192 --passkey-lengths 2048,4096,8192 --depths 0.1,0.5,0.9 \
  --json bench/quality/smollm2.json 2>&1 | grep -v "GGUF\|Loading weights" | tee bench/quality/smollm2.log
