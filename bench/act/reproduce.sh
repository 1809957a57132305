#!/usr/bin/env bash
# ACT figures (CPU; the calibration takes ~50 min on 1-2 cores):
#   bash bench/act/reproduce.sh        (repository root as cwd)
#   smollm2_act.json        the calibrated head list and its calibration / held-out accuracy (log: calibrate.log)
#   evidence.json           sink mass before / after per calibrated head, fused vs eager output
#   heldout_ablation.json   held-out accuracy: no calibration, every candidate head, the shipped list
# Stamped: none of the three records the environment or the commit (smollm2_act.json's "meta" holds the calibration
# settings only).
set -euo pipefail
out=${OUT:-bench/act}
mkdir -p "$out"
patchattn calibrate act --model smollm2 --samples 64 --heldout 256 --context 20 --text-offset 0 \
    --out "$out/smollm2_act.json" 2>&1 | tee "$out/calibrate.log"
python3 bench/act/evidence.py > "$out/evidence.json"
python3 bench/act/heldout_ablation.py > "$out/heldout_ablation.json"
