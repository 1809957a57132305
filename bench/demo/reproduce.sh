#!/usr/bin/env bash
# The demo on CPU with its defaults (SmolLM2, 2,048 tokens of pydoc text, every training-free method): the wall
# time of each method's row (perplexity pass + a 16-token greedy answer) and of the whole run, i.e. what a new user
# waits for and what each method costs on the CPU path.
#   bash bench/demo/reproduce.sh        (repository root as cwd; a few minutes on 2 cores)
# Writes demo.json (rows, threads, environment() with the source commit and date) and demo.txt (the printed table
# and the total wall time).
set -euo pipefail
out=${OUT:-bench/demo}
mkdir -p "$out"
start=$(date +%s)
patchattn demo --json "$out/demo.json" 2>&1 | grep --line-buffered -v "GGUF\|Loading weights\|it/s\]" | tee "$out/demo.txt"
echo "total wall time: $(( $(date +%s) - start )) s on $(nproc) cores" | tee -a "$out/demo.txt"
