# Run from the repository root on a CUDA GPU: PATCHATTN_AUTOTUNE=0 PYTHONPATH=. python3 bench/kernel/delta_d64/delta_ab.py
"""The split backward alone, side by side: delta = rowsum(dO * O) by its own kernel (FUSE_DELTA off) or formed by
the dQ pass (on, the default). bf16, 32 q / 8 kv heads, causal, block 128, random lists at each density, the first
fitting config (no autotuning) so only the delta's source differs. Writes delta_ab.json to $OUT (or here)."""
import os

from patchattn.bench.kernel import backward_switch_ab
from patchattn.kernels.blocksparse import triton_bwd

backward_switch_ab(triton_bwd, "FUSE_DELTA", {"own_kernel": False, "dq_pass": True}, "delta",
                   out=os.path.join(os.environ.get("OUT", "bench/kernel/delta_d64"), "delta_ab.json"))
