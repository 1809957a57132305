#!/usr/bin/env bash
# bench/methods/tree_tune.* (repository root as cwd; results in $OUT or bench/methods).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/methods}
timeout 240 python3 bench/methods/tree_tune.py > "$out/${LOG:-tree_tune}.log" 2>&1
cat "$out/${LOG:-tree_tune}.log" | tail -12
