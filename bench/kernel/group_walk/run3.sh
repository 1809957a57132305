#!/usr/bin/env bash
# Call 3 behind bench/kernel/group_walk/ (repository root as cwd; results in $OUT): fwd+bwd at head_dim 64 against
# SDPA and FlexAttention on the same masks with the final defaults ("auto" group walk: flat below head_dim 128).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/kernel/group_walk/run3}
mkdir -p "$out"
timeout 400 python3 -m patchattn.bench.kernel --modes fwdbwd --T 16384,65536 --densities 0.5,0.1,0.02 --head-dims 64 \
    --flex-bwd-max-t 65536 --csv "$out/fwdbwd_d64.csv" --json "$out/fwdbwd_d64.json" > "$out/fwdbwd_d64.log" 2>&1
grep -E '"(ours|flex)"' "$out/fwdbwd_d64.log" | cut -c1-330
