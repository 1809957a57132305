#!/usr/bin/env bash
# MoH figures:
#   bash bench/moh/reproduce.sh speed     # CUDA GPU -> h200.csv (table on stdout -> h200.txt)
#   bash bench/moh/reproduce.sh quality   # CPU      -> quality.json
# Stamped: the speed run prints patchattn.report.environment() at the end of h200.txt; the CSV itself records no
# environment and no commit; quality.json records neither.
set -euo pipefail
out=${OUT:-bench/moh}
mkdir -p "$out"
case ${1:-speed} in
  speed)   python3 -m patchattn.bench.moh --csv "$out/h200.csv" | tee "$out/h200.txt" ;;
  quality) python3 bench/moh/quality.py > "$out/quality.json" ;;
  *) echo "usage: $0 speed|quality" >&2; exit 2 ;;
esac
