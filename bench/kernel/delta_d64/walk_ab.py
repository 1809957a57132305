# Run from the repository root on a CUDA GPU: PATCHATTN_AUTOTUNE=0 PYTHONPATH=. python3 bench/kernel/delta_d64/walk_ab.py
"""The split backward alone, side by side: the dK/dV pass walking each head's transposed list in one pipelined loop
with the masked (diagonal) entries behind a branch ("one", which spills ~16 registers per iteration at 64x128 tiles),
in two pipelined loops ("two"), or with the masked prefix unpipelined ("peel": run once for run7/, never won, and
removed from triton_bwd afterwards; this script now times "one" and "two"). bf16, 32 q / 8 kv heads, causal,
block 128, random lists, first config (no autotuning), launch order by head_dim. Writes walk_ab.json to $OUT."""
import os

from patchattn.bench.kernel import backward_switch_ab
from patchattn.kernels.blocksparse import triton_bwd

backward_switch_ab(triton_bwd, "DKDV_WALK", {"one": "one", "two": "two"}, "walk",
                   out=os.path.join(os.environ.get("OUT", "bench/kernel/delta_d64"), "walk_ab.json"))
