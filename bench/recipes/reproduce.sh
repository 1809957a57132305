#!/usr/bin/env bash
# Fine-tuning recipe figures (a CUDA GPU: ~2-4 min a recipe on an H200; each recipe's train.json holds the settings:
# 150 steps x 2048 tokens, held-out eval every 50 steps):
#   bash bench/recipes/reproduce.sh [names...]     (repository root as cwd; default: all five)
# Recipes: longlora, sinklora, moh (recipes/<name>); controls: dense_lora_plus, dense_lora (bench/recipes/controls/,
# full attention with the same LoRA settings). Per run: runs/<name>/ (adapter, checkpoints; git-ignored), and the
# small outputs copied to bench/recipes/<name>/: metrics.json (every number of the table), log.jsonl, loss.png.
# Then the table: python3 bench/recipes/table.py
# Stamped: metrics.json records the recipe, model, settings and wall time; not the GPU, versions or commit.
set -euo pipefail
names=("$@")
[ $# -gt 0 ] || names=(longlora sinklora moh dense_lora_plus dense_lora)
for name in "${names[@]}"; do
  case $name in
    dense_lora|dense_lora_plus) folder=bench/recipes/controls/$name ;;
    *) folder=recipes/$name ;;
  esac
  patchattn train "$folder" --no-progress --output "runs/$name"
  mkdir -p "bench/recipes/$name"
  cp "runs/$name/metrics.json" "runs/$name/log.jsonl" "runs/$name/loss.png" "bench/recipes/$name/"
done
python3 bench/recipes/table.py
