#!/usr/bin/env bash
# Issue 23's trained attentions on SmolLM2 (a CUDA GPU; repository root as cwd), the runs side by side on one GPU
# (a 135M model at batch 1 leaves an H200 mostly idle, so parallel processes cost little wall time):
#   bash bench/recipes/trained.sh [names...]
# Names (NAME:STEPS runs fewer steps): selective softplus landmark dma lightning hybrid hybrid_k4 hybrid_k2 dense_lora dense_lora_1024
# (default: all). hybrid is the shipped recipe (1 softmax layer in 8, MiniMax-01); hybrid_k4 / hybrid_k2 the same
# recipe with softmax_every 4 / 2 (built under runs/recipes/); lightning is the all-linear end. dense_lora_1024 is the
# dense-LoRA control at lightning's and hybrid's 1024 tokens and 200 steps (its step-150 evaluation is lightning's
# control: constant LR, same seed and data order). Then passkey at 2k/4k/8k (tuned at 2k) for selective, softplus,
# landmark and dense_lora, written to bench/recipes/passkey_extrapolation.json.
# Per run: runs/<name>/ (git-ignored); bench/recipes/<name>/ gets metrics.json, log.jsonl, loss.png, train.txt (its log).
set -uo pipefail
names=("$@")
[ $# -gt 0 ] || names=(selective softplus landmark dma lightning hybrid hybrid_k4 hybrid_k2 dense_lora dense_lora_1024)
mkdir -p runs/recipes

variant() {  # variant NAME SOFTMAX_EVERY: the shipped hybrid recipe with another softmax ratio
    rm -rf "runs/recipes/$1" && cp -r patchattn/recipes/hybrid "runs/recipes/$1"
    python3 - "runs/recipes/$1/patch.json" "$2" <<'PY'
import json, sys
path, every = sys.argv[1], int(sys.argv[2])
patch = json.load(open(path))
patch["softmax_every"] = every
json.dump(patch, open(path, "w"))
PY
}

one() {  # one NAME[:STEPS]: train it (STEPS: fewer steps than the recipe's), copy its small outputs
    local name=${1%%:*} folder=${1%%:*} extra=()
    [[ $1 == *:* ]] && extra=(--steps "${1##*:}")
    case $name in
        dense_lora) folder=bench/recipes/controls/dense_lora ;;
        dense_lora_1024) folder=bench/recipes/controls/dense_lora; extra=(--seq-len 1024 --steps 200 "${extra[@]}") ;;
        hybrid_k4) variant hybrid_k4 4; folder=runs/recipes/hybrid_k4 ;;
        hybrid_k2) variant hybrid_k2 2; folder=runs/recipes/hybrid_k2 ;;
    esac
    mkdir -p "bench/recipes/$name"
    python3 -m patchattn train "$folder" --no-progress --output "runs/$name" "${extra[@]}" \
        > "bench/recipes/$name/train.txt" 2>&1
    echo "$name: exit $? ($(date -u +%H:%M:%S))"
    cp "runs/$name/metrics.json" "runs/$name/log.jsonl" "runs/$name/loss.png" "bench/recipes/$name/" 2>/dev/null
}

for name in "${names[@]}"; do one "$name" & done
wait
passkey=()
for name in selective softplus landmark dense_lora; do [ -f "runs/$name/metrics.json" ] && passkey+=("runs/$name"); done
[ ${#passkey[@]} -eq 0 ] || python3 bench/recipes/passkey_extrapolation.py "${passkey[@]}" \
    --lengths 2048 4096 8192 --output bench/recipes/passkey_extrapolation.json
python3 bench/recipes/table.py
