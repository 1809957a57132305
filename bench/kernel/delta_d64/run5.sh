#!/usr/bin/env bash
# Call 5 behind bench/kernel/delta_d64/ (repository root as cwd; packed into $OUT/run5.tar.gz): forward+backward
# against SDPA and FlexAttention on the same masks with this session's backward (delta in the dQ pass, launch order
# by head_dim, the 32x128 dK/dV tile among the autotuned configs), head_dim 128 and 64, Flex fwd+bwd up to 64k.
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=$(mktemp -d)/run5
mkdir -p "$out"
for d in 128 64; do
  timeout 270 python3 patchattn/bench/kernel.py --modes fwdbwd --T 16384,65536 --densities 1.0,0.5,0.1,0.02 \
      --head-dims $d --flex-bwd-max-t 65536 --csv "$out/fwdbwd_d$d.csv" --json "$out/fwdbwd_d$d.json" \
      > "$out/fwdbwd_d$d.log" 2>&1
  grep -E "^fwdbwd" "$out/fwdbwd_d$d.log" | grep -v "| sdpa" | cut -c1-120
done
tar -czf "${OUT:-.}/run5.tar.gz" -C "$(dirname "$out")" run5
