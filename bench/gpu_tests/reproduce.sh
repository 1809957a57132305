#!/usr/bin/env bash
# The test suite on a GPU, Triton kernels compiled (not interpreted):
#   bash bench/gpu_tests/reproduce.sh                          the kernel suite: kernels.log (the README's figure)
#   bash bench/gpu_tests/reproduce.sh <log name> <pytest args...>   any other selection (logs in $OUT or bench/gpu_tests/)
# Autotuning off (the kernel tests take the first config of each kernel: tests/kernels/conftest.py). Stamped: env_<name>.txt
# (GPU, driver, torch, triton, transformers, date); not the commit (the device's copy of the repository has no
# reliable git metadata): the tree each log was made from is named in bench/gpu_tests/RESULTS.md.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
out=${OUT:-bench/gpu_tests}
if [ $# -eq 0 ]; then set -- kernels tests/kernels; fi
name=$1; shift
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  date -u; } > "$out/env_$name.txt"
timeout "${LIMIT:-540}" python3 -m pytest -q -p no:cacheprovider -p no:benchmark -n 14 -rfEs --durations=15 "$@" \
  > "$out/$name.log" 2>&1
echo "exit $?" >> "$out/$name.log"
tail -25 "$out/$name.log"
