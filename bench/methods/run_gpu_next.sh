#!/usr/bin/env bash
# Run 6 (bench/methods/RESULTS.md): blocktopk's prefill selection with the fused Triton block scores
# (`fused_scores`, kernels/blockselect/triton_prefill.py, now the default) next to the chunked torch scores
# (`fused_scores=false`), at 32k and 128k (repository root as cwd).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0
out=${OUT:-bench/methods}
python3 -m pytest -q tests/kernels/test_blockselect.py -p no:cacheprovider
python3 -m patchattn.bench.methods --methods 'blocktopk@torch:{"fused_scores":false};blocktopk' \
    --prefill 32768,131072 --decode "" --csv "$out/h200_fused_scores.csv" 2>&1 | tee "$out/h200_fused_scores.log"
