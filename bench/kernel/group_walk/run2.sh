#!/usr/bin/env bash
# Call 2 behind bench/kernel/group_walk/ (repository root as cwd; results in $OUT): the dK/dV tile configs x group
# walks at head_dim 128 (dkdv_configs.py).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=. PATCHATTN_AUTOTUNE=0
out=${OUT:-bench/kernel/group_walk/run2}
mkdir -p "$out"
OUT="$out" timeout 480 python3 bench/kernel/group_walk/dkdv_configs.py > "$out/dkdv_configs.log" 2>&1
grep -v Warn "$out/dkdv_configs.log" | cut -c1-160 | tail -40
