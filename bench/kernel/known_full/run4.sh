#!/usr/bin/env bash
# Call 4 behind bench/kernel/known_full/: per-kernel GPU time of fwd+bwd at 16k, ours and Flex (profile_16k.py).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/kernel/known_full}
timeout 240 python3 bench/kernel/known_full/profile_16k.py > "$out/profile_16k.log" 2>&1
grep -v Warning "$out/profile_16k.log" | tail -40
