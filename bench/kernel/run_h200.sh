#!/usr/bin/env bash
# What produced bench/kernel/results.csv on the H200 (run from the repository root; OUT = output dir).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-bench/kernel}
python3 patchattn/bench/kernel.py --csv "$OUT/results.csv" --json "$OUT/results.json" "$@" 2>&1 | tee "$OUT/bench.log"
