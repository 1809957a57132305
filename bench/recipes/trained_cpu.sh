#!/usr/bin/env bash
# Issue 23's trained attentions re-run on CPU (2 cores) after their CPU fixes, shortened so each fits in well under an
# hour, one run at a time (repository root as cwd):
#   bash bench/recipes/trained_cpu.sh [names...]   (default: landmark dma hybrid dense_lora dense_lora_1024 passkey hybrid_k4 hybrid_k2)
# landmark, dma, dense_lora: 50 of their 150 steps at 2,048 tokens (evaluations scaled to 3 held-out chunks);
# hybrid, hybrid_k4 / hybrid_k2 (1 softmax layer in 4 / 2), dense_lora_1024: 100 steps at 1,024 tokens, 4 held-out chunks (hybrid:
# 50 transfer + 50 LoRA steps). passkey: landmark's tuned run at 2k/4k/8k. Each run's metrics.json stamps the commit
# and the machine; bench/recipes/cpu/<name>/ gets metrics.json, log.jsonl, loss.png.
set -uo pipefail
names=("$@")
[ $# -gt 0 ] || names=(landmark dma hybrid dense_lora dense_lora_1024 passkey hybrid_k4 hybrid_k2)
mkdir -p runs/recipes bench/recipes/cpu

train() {  # train NAME FOLDER ARGS...: one run, its small outputs copied
    local name=$1 folder=$2
    shift 2
    python3 -m patchattn train "$folder" --no-progress --output "runs/cpu_$name" "$@" > "runs/cpu_$name.txt" 2>&1
    echo "$name: exit $? ($(date -u +%H:%M:%S))"
    mkdir -p "bench/recipes/cpu/$name"
    cp "runs/cpu_$name/metrics.json" "runs/cpu_$name/log.jsonl" "runs/cpu_$name/loss.png" "bench/recipes/cpu/$name/" 2>/dev/null
}

for name in "${names[@]}"; do
    case $name in
    landmark|dma) train "$name" "$name" --steps 50 ;;
    dense_lora) train dense_lora bench/recipes/controls/dense_lora --steps 50 ;;
    hybrid) train hybrid hybrid --steps 100 ;;
    hybrid_k4|hybrid_k2)
        every=${name#hybrid_k}
        rm -rf "runs/recipes/$name" && cp -r patchattn/recipes/hybrid "runs/recipes/$name"
        python3 -c "import json, sys; p = sys.argv[1]; d = json.load(open(p)); d['softmax_every'] = int(sys.argv[2]); json.dump(d, open(p, 'w'))" "runs/recipes/$name/patch.json" "$every"
        train "$name" "runs/recipes/$name" --steps 100 ;;
    dense_lora_1024) train dense_lora_1024 bench/recipes/controls/dense_lora --seq-len 1024 --steps 100 --eval-chunks 4 ;;
    passkey) python3 bench/recipes/passkey_extrapolation.py runs/cpu_landmark --lengths 2048 4096 8192 \
                 --output bench/recipes/cpu/passkey_landmark.json ;;
    *) echo "unknown name: $name" >&2; exit 2 ;;
    esac
done
