#!/usr/bin/env bash
# The commands behind bench/decode/ (repository root as cwd; results in $OUT or bench/decode):
# the GPU decode tests, the split-K kernel on random 5% lists and the sparse methods' whole decode steps at 128k
# keys, each timed with 1 layer per CUDA graph and with 8 layers per graph (each layer its own cache), and a
# kernel-by-kernel profile of a step.
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/decode}
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } | tee "$out/env.txt"
# The decode and selection tests on the GPU: full-size (marked gpu) and the small cases, which run there on CUDA
# instead of the interpreter (the 16-bit native scoring and the merge walks are only compiled there).
PATCHATTN_AUTOTUNE=0 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 6 -rA \
    tests/kernels/test_blocksparse_triton.py tests/kernels/test_blockselect.py \
    -k "decode or select or top or threshold or graph or 16_bit or tail or key_means" > "$out/gpu_tests_decode.log" 2>&1
tail -1 "$out/gpu_tests_decode.log"
for L in 1 8; do
    python3 patchattn/bench/kernel.py --modes decode --decode-T 131072 --decode-batches 1,8 --decode-densities 0.05 \
        --head-dims 128 --no-flex --decode-layers $L --csv "$out/kernel_decode_l$L.csv" \
        --json "$out/kernel_decode_l$L.json" > "$out/kernel_decode_l$L.log" 2>&1
    python3 -m patchattn.bench.methods --methods 'streaming;power;s2;blocktopk;hip;blocktopk@group:{"per_head":false}' \
        --prefill "" --decode 131072 --decode-batch 1,8 --decode-layers $L --csv "$out/methods_decode_l$L.csv" \
        > "$out/methods_decode_l$L.log" 2>&1
    tail -13 "$out/methods_decode_l$L.log"
done
python3 bench/decode/profile_step.py > "$out/profile_step.log" 2>&1
