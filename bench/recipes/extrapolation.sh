#!/usr/bin/env bash
# Issue 23: tune selective and softplus at 2,048 tokens (recipes/<name>, SmolLM2), and the dense LoRA control with the
# same LoRA settings, then passkey retrieval at 2k / 4k / 8k for the dense base and the three tuned runs
# (a CUDA GPU: a few minutes a recipe on an H200; repository root as cwd):
#   bash bench/recipes/extrapolation.sh
# Per run: runs/<name>/ (git-ignored); small outputs copied to bench/recipes/<name>/ (metrics.json, log.jsonl,
# loss.png); the passkey table in bench/recipes/passkey_extrapolation.json (printed as markdown).
set -euo pipefail
for name in selective softplus dense_lora; do
  case $name in
    dense_lora) folder=bench/recipes/controls/$name ;;
    *) folder=$name ;;
  esac
  patchattn train "$folder" --no-progress --output "runs/$name"
  mkdir -p "bench/recipes/$name"
  cp "runs/$name/metrics.json" "runs/$name/log.jsonl" "runs/$name/loss.png" "bench/recipes/$name/"
done
python3 bench/recipes/passkey_extrapolation.py runs/selective runs/softplus runs/dense_lora \
  --lengths 2048 4096 8192 --output bench/recipes/passkey_extrapolation.json
