#!/usr/bin/env bash
# Call 5 behind bench/kernel/known_full/ (repository root as cwd; results in $OUT): hip-attn's decode steps at 128k
# beside ours (bench/methods/hip_attn_peer.py --decode-T; prefill skipped, it is in run3).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/kernel/known_full}
timeout 400 python3 bench/methods/hip_attn_peer.py .whl/hip_attn-1.2.9-py3-none-any.whl --T "" --decode-T 131072 \
    --json "$out/hip_attn_decode.json" 2>&1 | grep -v "UserWarning\|warnings.warn" > "$out/hip_attn_decode.log"
tail -4 "$out/hip_attn_decode.log" | cut -c1-1200
