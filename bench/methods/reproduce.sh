#!/usr/bin/env bash
# Sparse-method speed figures (CUDA GPU): each method's default config at Llama-3-8B attention shapes (bf16, 32 q /
# 8 kv heads, head_dim 128, random q/k/v), its own block selection timed, vs SDPA and FlexAttention on the same lists.
#   bash bench/methods/reproduce.sh          (repository root as cwd)
# One run, one results file per figure:
#   speed.csv       prefill at 32k and 128k: the prefill column of the README's decision table and bench/sparse/
#                   (decode steps are timed by bench/decode/reproduce.sh in processes of their own: timed after the
#                   prefill half in the same process they measure up to 2x slower, bench/decode/RESULTS.md)
#   speed_512k.csv  prefill at 512k for streaming, hip, blocktopk (no Flex)
# Stamped: each CSV's first line holds patchattn.report.environment() (GPU, torch, triton, transformers, patchattn
# version) and the command; not the commit.
# The hip-attn comparison (the HiP authors' package, run from its unpacked wheel) is not part of this script:
#   python3 bench/methods/hip_attn_peer.py WHEEL --T 32768,131072 --json bench/methods/hip_attn_peer.json
#   python3 bench/methods/hip_attn_peer.py WHEEL --T "" --decode-T 131072 --json bench/methods/hip_attn_decode.json
set -euo pipefail
out=${OUT:-bench/methods}
mkdir -p "$out"
patchattn bench methods --decode "" --csv "$out/speed.csv"
patchattn bench methods --methods streaming,hip,blocktopk --prefill 524288 --decode "" --no-flex \
    --csv "$out/speed_512k.csv"
