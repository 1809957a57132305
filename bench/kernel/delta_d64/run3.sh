#!/usr/bin/env bash
# Call 3 behind bench/kernel/delta_d64/ (repository root as cwd; output in $OUT/ncu_bwd.txt): Nsight Compute on one
# backward of ours (dQ pass, dK/dV pass) and FlexAttention's backward kernel, same mask (ncu_bwd.py).
set -uo pipefail
export PYTHONUNBUFFERED=1 PATCHATTN_CHECKS=0 PYTHONPATH=. PATCHATTN_AUTOTUNE=0
out=${OUT:-bench/kernel/delta_d64}
timeout 400 ncu --clock-control none --target-processes all \
    -k 'regex:_dq_kernel|_dkdv_kernel|flex_attention_backward|tem_fused' \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section InstructionStats \
    python3 bench/kernel/delta_d64/ncu_bwd.py > "$out/ncu_bwd.txt" 2>&1
echo "rc=$?"; grep -E "^  [a-z_]+.*\(|Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput|Executed Ipc A|Stall|Theoretical Occ|Dynamic Shared|Block Limit" "$out/ncu_bwd.txt" | head -80
