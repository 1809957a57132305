#!/usr/bin/env bash
# Not run yet (no device time left in the session that wrote it): blocktopk's prefill selection with the fused
# Triton block scores (`fused_scores`, kernels/blockselect/triton_prefill.py) next to the default chunked torch
# scores, at 32k and 128k (repository root as cwd).  If it is correct and faster on the GPU, make it the default.
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0
out=${OUT:-bench/methods}
python3 -m pytest -q tests/kernels/test_blockselect.py -p no:cacheprovider
python3 -m patchattn.bench.methods --methods 'blocktopk;blocktopk@fused:{"fused_scores":true}' \
    --prefill 32768,131072 --decode "" --csv "$out/h200_fused_scores.csv" 2>&1 | tee "$out/h200_fused_scores.log"
