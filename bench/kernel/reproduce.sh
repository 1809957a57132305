#!/usr/bin/env bash
# Kernel figures (CUDA GPU): the block-sparse engine vs SDPA vs FlexAttention on the same block lists.
#   bash bench/kernel/reproduce.sh        (repository root as cwd; ~10 min on an H200)
# One run, one results file per figure:
#   kernel.csv/.json     forward, forward+backward and decode at head_dim 64 and 128 (the kernel table of RESULTS.md)
#   decode_l8.csv/.json  decode with 8 layers per CUDA graph (the "8 layers per graph" decode figure)
# Stamped: the CSV's first line and the JSON's "meta" hold GPU, torch, triton, python, the command and the date
# (not the commit, not transformers/patchattn versions: see bench/README.md).
set -euo pipefail
out=${OUT:-bench/kernel}
mkdir -p "$out"
patchattn bench kernel --modes fwd,fwdbwd,decode --head-dims 64,128 --flex-bwd-max-t 65536 \
    --csv "$out/kernel.csv" --json "$out/kernel.json"
patchattn bench kernel --modes decode --decode-T 131072 --decode-densities 0.05 --head-dims 128 --no-flex \
    --decode-layers 8 --csv "$out/decode_l8.csv" --json "$out/decode_l8.json"
