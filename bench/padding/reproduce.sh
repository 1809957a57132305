#!/usr/bin/env bash
# Batched generate with left padding (CUDA GPU): each sparse method vs SDPA, on a same-length batch and on a
# left-padded batch of four rows (32k, 24k, 16k, 8k tokens), 32 new tokens; whether each padded row's tokens equal
# the row generated alone.  Writes padded_generate.json (environment, commit, command stamped).
#   bash bench/padding/reproduce.sh        (repository root as cwd)
set -euo pipefail
out=${OUT:-bench/padding}
mkdir -p "$out"
python3 bench/padding/padded_generate.py "$out/padded_generate.json"
