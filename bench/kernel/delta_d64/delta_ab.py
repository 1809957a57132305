# Run from the repository root on a CUDA GPU: PATCHATTN_AUTOTUNE=0 PYTHONPATH=. python3 bench/kernel/delta_d64/delta_ab.py
"""The split backward alone, side by side: delta = rowsum(dO * O) by its own kernel (FUSE_DELTA off) or formed by
the dQ pass (on, the default). bf16, 32 q / 8 kv heads, causal, block 128, random lists at each density, the first
fitting config (no autotuning) so only the delta's source differs. Writes delta_ab.json to $OUT (or here)."""
import json
import os

from patchattn.bench.kernel import backward_points, rel_err, time_ms
from patchattn.kernels import blocksparse as bs
from patchattn.kernels.blocksparse import triton_bwd

rows = []
for p in backward_points(bs, densities=(0.5, 0.1, 0.02)):
    grads = {}
    for fuse in (False, True):
        triton_bwd.FUSE_DELTA = fuse
        t = time_ms(p.split_backward)
        grads[fuse] = p.split_backward()
        err = max(rel_err(a, b) for a, b in zip(grads[fuse], grads[False]))
        rows.append(dict(D=p.D, T=p.T, density=p.density, delta="dq_pass" if fuse else "own_kernel", bwd_ms=t,
                         fwd_ms=p.fwd_ms, bwd_fwd=t / p.fwd_ms, max_rel_diff=err))
        print(json.dumps(rows[-1]), flush=True)
    triton_bwd.FUSE_DELTA = True
    del grads
json.dump(rows, open(os.path.join(os.environ.get("OUT", "bench/kernel/delta_d64"), "delta_ab.json"), "w"), indent=1)
