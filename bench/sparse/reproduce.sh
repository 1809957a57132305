#!/usr/bin/env bash
# The quality-vs-speed table and plot: one quality JSON (CPU sweep) and one speed CSV (GPU run), one command.
#   bash bench/quality/reproduce.sh smollm2     # CPU, ~1.5 h on 2 cores -> bench/quality/smollm2.json
#   bash bench/methods/reproduce.sh             # CUDA GPU, ~1 min       -> bench/methods/speed.csv (prefill)
#   bash bench/decode/reproduce.sh              # CUDA GPU, ~2 min       -> bench/decode/steps_l8.csv (decode steps)
#   bash bench/sparse/reproduce.sh              # any machine, seconds   -> bench/sparse/table.md, quality_vs_speed.png
# (prefill and decode are two files because they are timed in separate processes: bench/decode/RESULTS.md)
# Optional: PEER=1 adds the hip-attn speed row from bench/methods/hip_attn_{peer,decode}.json.
# Stamped: the inputs carry their environment (the JSON's "environment", the CSV's first line); the table and plot
# do not repeat it and record no commit.
set -euo pipefail
quality=${QUALITY:-bench/quality/smollm2.json}
speed=${SPEED:-bench/methods/speed.csv}
decode=${DECODE:-bench/decode/steps_l8.csv}
out=${OUT:-bench/sparse}
peer=()
if [ -n "${PEER:-}" ]; then
  peer=(--peer hip-attn=bench/methods/hip_attn_peer.json --peer hip-attn=bench/methods/hip_attn_decode.json)
fi
tmp=$(mktemp -d)
# `patchattn bench report` writes RESULTS.md + quality_vs_speed.png into --out; keep the curated RESULTS.md and
# take the generated table as table.md.
patchattn bench report --quality "$quality" --speed "$speed" --speed "$decode" "${peer[@]}" --out "$tmp"
mkdir -p "$out"
mv "$tmp/RESULTS.md" "$out/table.md"
mv "$tmp/quality_vs_speed.png" "$out/quality_vs_speed.png"
rmdir "$tmp"
