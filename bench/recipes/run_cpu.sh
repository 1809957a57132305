#!/usr/bin/env bash
# Real runs of the shipped recipes on SmolLM2-135M (CPU), and the copy of their small outputs into bench/recipes/.
# Each run writes runs/<recipe>/ (git-ignored: adapter, checkpoints); only log, metrics and plot are committed.
set -euo pipefail
cd "$(dirname "$0")/../.."
for recipe in "${@:-longlora sinklora moh}"; do
  for name in $recipe; do
    nice -n 5 patchattn train "recipes/$name" --no-progress
    mkdir -p "bench/recipes/$name"
    cp "runs/$name/metrics.json" "runs/$name/log.jsonl" "runs/$name/loss.png" "bench/recipes/$name/"
  done
done
