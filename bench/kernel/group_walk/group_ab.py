# Run from the repository root on a CUDA GPU: PATCHATTN_AUTOTUNE=0 PYTHONPATH=. python3 bench/kernel/group_walk/group_ab.py
"""The split backward alone, side by side: the dK/dV pass walking the q heads of a GQA group that share one list as
one walk over (entry, head) pairs ("flat": one or two pipelined loops per program) or one walk per head ("loop": four
or eight at GQA 4, each with its own pipeline fill). bf16, 32 q / 8 kv heads, lists per KV head, causal, block 128,
random lists, first config (no autotuning), the other backward choices by head_dim. Writes group_ab.json to $OUT."""
import os

from patchattn.bench.kernel import backward_switch_ab
from patchattn.kernels.blocksparse import triton_bwd

backward_switch_ab(triton_bwd, "GROUP_WALK", {"loop": "loop", "flat": "flat"}, "group_walk",
                   densities=(1.0, 0.5, 0.1, 0.02),
                   out=os.path.join(os.environ.get("OUT", "bench/kernel/group_walk"), "group_ab.json"))
