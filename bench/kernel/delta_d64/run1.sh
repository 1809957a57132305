#!/usr/bin/env bash
# Call 1 behind bench/kernel/delta_d64/ (repository root as cwd; results in $OUT or there): GPU tests of the
# backward's two delta sources, the delta A/B (delta_ab.py), the head_dim-64 forward with and without FlexAttention's
# 128x128 / 4-warp config (fwd_configs.py, autotuned, vs SDPA and Flex), and blocktopk's 512k prefill with its fused
# choice.
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=${OUT:-bench/kernel/delta_d64/run1}
methods_out=${METHODS_OUT:-$out}
mkdir -p "$out" "$methods_out"
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } | tee "$out/env.txt"
PATCHATTN_AUTOTUNE=0 timeout 100 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 6 -rA \
    tests/kernels/test_blocksparse_triton.py -k "delta_sources" > "$out/gpu_tests_delta.log" 2>&1
tail -1 "$out/gpu_tests_delta.log"
PATCHATTN_AUTOTUNE=0 OUT="$out" timeout 120 python3 bench/kernel/delta_d64/delta_ab.py > "$out/delta_ab.log" 2>&1
tail -12 "$out/delta_ab.log"
for arm in old new; do
  timeout 110 python3 bench/kernel/delta_d64/fwd_configs.py $arm --modes fwd --T 16384,65536 \
      --densities 0.5,0.1,0.02 --head-dims 64 --csv "$out/fwd_d64_$arm.csv" --json "$out/fwd_d64_$arm.json" \
      > "$out/fwd_d64_$arm.log" 2>&1
  grep -E '"impl": "(ours|flex)"' "$out/fwd_d64_$arm.log" | cut -c1-200 | tail -12
done
timeout 100 python3 -m patchattn.bench.methods --methods 'blocktopk' --prefill 524288 --decode '' --no-flex \
    --csv "$methods_out/h200_blocktopk_512k_fused.csv" > "$methods_out/h200_blocktopk_512k_fused.log" 2>&1
tail -3 "$methods_out/h200_blocktopk_512k_fused.log"
