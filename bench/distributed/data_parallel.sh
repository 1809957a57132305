#!/usr/bin/env bash
# Training throughput of a recipe on one GPU, under DDP and under FSDP2 on 2 GPUs (the committed accelerate
# configs), same recipe and steps; then tokens/s per run (bench/distributed/data_parallel.py).  Repository root:
#   bash bench/distributed/data_parallel.sh [recipe (moh)] [steps (40)]
# Each process reads its own rows, so a 2-process step trains twice the tokens of a 1-process step.
set -euo pipefail
recipe=${1:-moh}
steps=${2:-40}
common=(--no-eval --no-progress --steps "$steps")
python -m patchattn train "$recipe" "${common[@]}" --output "runs/dp_${recipe}_1gpu"
accelerate launch --config_file patchattn/recipes/accelerate/ddp.yaml -m patchattn.train "$recipe" "${common[@]}" \
    --output "runs/dp_${recipe}_ddp2"
accelerate launch --config_file patchattn/recipes/accelerate/fsdp2.yaml -m patchattn.train "$recipe" "${common[@]}" \
    --output "runs/dp_${recipe}_fsdp2"
python bench/distributed/data_parallel.py "runs/dp_${recipe}_1gpu" "runs/dp_${recipe}_ddp2" "runs/dp_${recipe}_fsdp2" \
    --csv bench/distributed/data_parallel.csv
