#!/usr/bin/env bash
# Decode steps of the static patterns after their lists became memoised per key block (run 11 of
# bench/decode/RESULTS.md): 128k keys, batch 1 and 8, one and eight layers per CUDA graph, plus the host profile.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
out=${OUT:-bench/decode/memo/run1}
mkdir -p "$out"
for L in 1 8; do
  timeout 250 python3 -m patchattn.bench.methods --methods streaming,power,s2 --prefill "" --decode 131072 \
    --decode-batch 1,8 --decode-layers $L --csv "$out/methods_decode_l$L.csv" > "$out/methods_decode_l$L.log" 2>&1
  grep -v -i warn "$out/methods_decode_l$L.log" | tail -9
done
timeout 120 python3 bench/decode/host_profile.py "$out" streaming power s2 > "$out/host_profile.log" 2>&1
grep -v -i warn "$out/host_profile.log"
