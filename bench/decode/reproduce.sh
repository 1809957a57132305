#!/usr/bin/env bash
# Decode-step figures (CUDA GPU): each sparse method's whole decode step (its block selection + the split-K kernel)
# at 128k keys, batch 1 and 8, eagerly and replayed from a CUDA graph, against SDPA timed the same way.
#   bash bench/decode/reproduce.sh        (repository root as cwd)
# One run per graph depth, one results file each:
#   steps_l1.csv   one layer per CUDA graph
#   steps_l8.csv   eight layers per CUDA graph, each its own cache (how a served model's graph runs them): the decode
#                  column of the README's decision table and of bench/sparse/
# Each in a process of its own, without prefill rows before it (they slow the decode timings down, RESULTS.md).
# Stamped: each CSV's first line holds patchattn.report.environment() (GPU, torch, triton, transformers, patchattn
# version) and the command; not the date or the commit. (The kernel alone: bench/kernel/reproduce.sh.)
set -euo pipefail
out=${OUT:-bench/decode}
methods=streaming,power,s2,moa,duo,hyper,blocktopk,hip
mkdir -p "$out"
for layers in 1 8; do
  patchattn bench methods --methods "$methods" --prefill "" --decode 131072 --decode-batch 1,8 \
      --decode-layers "$layers" --csv "$out/steps_l$layers.csv"
done
