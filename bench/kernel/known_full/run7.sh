#!/usr/bin/env bash
# Call 7 behind bench/kernel/known_full/ (repository root as cwd; results in $OUT): the head_dim-64 forward at 64k
# against Flex (the one-loop run's 0.94/0.95x at 50/10% was a single run), autotuned, through `patchattn bench kernel`.
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/kernel/known_full}
timeout 300 python3 -m patchattn.bench.kernel --modes fwd --T 65536 --densities 0.5,0.1,0.02 --head-dims 64 \
    --csv "$out/fwd_d64_64k.csv" --json "$out/fwd_d64_64k.json" > "$out/fwd_d64_64k.log" 2>&1
grep -E '"(ours|flex)"' "$out/fwd_d64_64k.log" | cut -c1-300
