#!/usr/bin/env bash
# Call 8 behind bench/kernel/delta_d64/ (repository root as cwd; results in $OUT or bench/kernel/delta_d64/run8):
# forward+backward at head_dim 128 against SDPA and FlexAttention with the dK/dV walk chosen by head_dim ("two" at 128).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/kernel/delta_d64/run8}
mkdir -p "$out"
timeout 200 python3 patchattn/bench/kernel.py --modes fwdbwd --T 16384,65536 --densities 1.0,0.5,0.1,0.02 \
    --head-dims 128 --flex-bwd-max-t 65536 --csv "$out/fwdbwd_d128.csv" --json "$out/fwdbwd_d128.json" \
    > "$out/fwdbwd_d128.log" 2>&1
grep -E "^fwdbwd" "$out/fwdbwd_d128.log" | grep -v "| sdpa" | cut -c1-120
