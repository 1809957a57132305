#!/usr/bin/env bash
# model.generate end to end (CUDA GPU): Llama-3-8B shape (32 layers), random bf16 weights, each method beside SDPA in
# one run: time to first token, decode tokens/s, peak memory; default (dynamic) vs static cache.
#   bash bench/generate/reproduce.sh        (repository root as cwd)
# Writes generate_b1.csv (batch 1, 32k and 128k), generate_b8.csv (batch 8, 32k) and generate_compiled_probe.csv
# (4 layers, 4k: transformers' compiled static-cache step). First CSV line: environment and command.
set -euo pipefail
out=${OUT:-bench/generate}
mkdir -p "$out"
patchattn bench generate --lengths 32768,131072 --batch 1 --methods dense,hip,blocktopk,streaming \
    --caches dynamic,static --new-tokens 16 --csv "$out/generate_b1.csv"
patchattn bench generate --lengths 32768 --batch 8 --methods dense,hip,blocktopk,streaming --caches dynamic \
    --new-tokens 16 --csv "$out/generate_b8.csv"
patchattn bench generate --lengths 4096 --batch 1 --layers 4 --methods dense,blocktopk \
    --caches dynamic,static-compiled --new-tokens 8 --csv "$out/generate_compiled_probe.csv"
