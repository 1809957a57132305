#!/usr/bin/env bash
# Quality figures (CPU; ~1.5 h for SmolLM2 and ~1 h for Gemma on 2 cores): every training-free sparse method's
# default config against dense on the same tokens: perplexity ratio at 4k/8k tokens of CPython's pydoc text,
# density, passkey retrieval at 2k/4k/8k (depths 10/50/90%, greedy, through the KV cache).
#   bash bench/quality/reproduce.sh [smollm2|gemma|guide|budget]   (repository root as cwd; smollm2 and gemma when none)
# One fresh run per model (no --resume: rows of different code versions never mix), one results file each:
#   smollm2.json       the quality columns of the README's decision table and of bench/sparse/ (its --quality input)
#   gemma3-270m.json   the same at 8k on Gemma-3-270M (only its 3 full-attention layers are sparsified)
#   smollm2_guide.json every default at 8k on SmolLM2, perplexity on two texts (pydoc prose, stdlib Python source)
#                      and passkeys at 8k (~30 min on 2 cores): the quality columns of the README's decision table
#   smollm2_budget25.json  every sparse method at the same budget (density=0.25, docs/density.md) on SmolLM2 at 4k,
#                      perplexity on two texts (pydoc prose and standard-library Python source) and passkeys
#                      (~25 min on 2 cores): the "same budget" columns of the README's decision table
# Stamped: each JSON holds patchattn.report.environment() (device, versions, source commit, date) and the arguments.
set -euo pipefail
out=${OUT:-bench/quality}
methods=dense,streaming,power,s2,moa,duo,hyper,hip,blocktopk
models=("$@")
[ $# -gt 0 ] || models=(smollm2 gemma)
mkdir -p "$out"
for model in "${models[@]}"; do
  case $model in
    smollm2) patchattn bench quality --model smollm2 --methods "$methods" --ppl-lengths 4096,8192 \
                 --passkey-lengths 2048,4096,8192 --depths 0.1,0.5,0.9 --json "$out/smollm2.json" ;;
    gemma)   patchattn bench quality --model gemma3-270m --methods "$methods" --ppl-lengths 8192 \
                 --passkey-lengths 8192 --depths 0.1,0.5,0.9 --json "$out/gemma3-270m.json" ;;
    guide)   patchattn bench quality --model smollm2 --methods "$methods" --texts pydoc,stdlib --ppl-lengths 8192 \
                 --passkey-lengths 8192 --depths 0.1,0.5,0.9 --json "$out/smollm2_guide.json" ;;
    budget)  budget=""
             for m in streaming power s2 moa hyper hip blocktopk; do budget+=";$m@d25:{\"density\":0.25}"; done
             # duo's full heads alone read its retrieval_fraction (0.25 by default): half of that leaves the
             # streaming heads a share of the budget (duo refuses a density at or below its retrieval share).
             budget+=";duo@d25:{\"density\":0.25,\"retrieval_fraction\":0.125}"
             patchattn bench quality --model smollm2 --methods "dense$budget" --texts pydoc,stdlib \
                 --ppl-lengths 4096 --passkey-lengths 4096 --depths 0.1,0.5,0.9 --json "$out/smollm2_budget25.json" ;;
    *) echo "unknown model $model (smollm2, gemma, guide or budget)" >&2; exit 2 ;;
  esac
done
