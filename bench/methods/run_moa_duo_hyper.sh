#!/usr/bin/env bash
# Speed of moa, duo and hyper (the three methods the earlier runs left out) at Llama-3-8B attention shapes, H200:
# prefill 32k / 128k with their mask building and Flex on the same lists, decode at 128k, batch 1 and 8, one layer
# per CUDA graph (run 12 of bench/methods/RESULTS.md); duo also with kv_heads_together (DuoAttention's GQA rule), and
# s2 again (its decode lists are wider than 64 entries, so the split cap applies to it). Repository root as cwd;
# results in $OUT or bench/methods.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
out=${OUT:-bench/methods}
timeout 540 python3 -m patchattn.bench.methods --methods 'moa;duo;duo@kv:{"kv_heads_together":true};hyper;s2' --prefill 32768,131072 --decode 131072 \
  --decode-batch 1,8 --csv "$out/h200_moa_duo_hyper.csv" > "$out/h200_moa_duo_hyper.log" 2>&1
echo "exit $?"
grep -v -i "warn" "$out/h200_moa_duo_hyper.log" | tail -16
