#!/usr/bin/env bash
# Call 2 behind bench/kernel/delta_d64/ (repository root as cwd; everything packed into $OUT/run2.tar.gz, as the
# device returns few files a call): the backward's GPU tests for both delta sources, forward+backward against SDPA and
# FlexAttention at head_dim 128 with delta formed in the dQ pass (autotuned, Flex fwd+bwd up to 64k), and blocktopk's
# 512k prefill with its fused choice (call 1 printed it, its files did not come back).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=.
out=$(mktemp -d)/run2
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } | tee "$out/env.txt"
PATCHATTN_AUTOTUNE=0 timeout 100 python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 6 -rA \
    tests/kernels/test_blocksparse_triton.py -k "delta_sources" > "$out/gpu_tests_delta.log" 2>&1
tail -1 "$out/gpu_tests_delta.log"
timeout 100 python3 -m patchattn.bench.methods --methods 'blocktopk' --prefill 524288 --decode '' --no-flex \
    --csv "$out/h200_blocktopk_512k_fused.csv" > "$out/h200_blocktopk_512k_fused.log" 2>&1
tail -3 "$out/h200_blocktopk_512k_fused.log"
timeout 270 python3 patchattn/bench/kernel.py --modes fwdbwd --T 16384,65536 --densities 1.0,0.5,0.1,0.02 \
    --head-dims 128 --flex-bwd-max-t 65536 --csv "$out/fwdbwd_d128.csv" --json "$out/fwdbwd_d128.json" \
    > "$out/fwdbwd_d128.log" 2>&1
tail -22 "$out/fwdbwd_d128.log" | cut -c1-160
tar -czf "${OUT:-.}/run2.tar.gz" -C "$(dirname "$out")" run2
