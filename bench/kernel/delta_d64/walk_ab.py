# Run from the repository root on a CUDA GPU: PATCHATTN_AUTOTUNE=0 PYTHONPATH=. python3 bench/kernel/delta_d64/walk_ab.py
"""The split backward alone, side by side: the dK/dV pass walking each head's transposed list in one pipelined loop
with the masked (diagonal) entries behind a branch ("one", which spills ~16 registers per iteration at 64x128 tiles),
in two pipelined loops ("two"), or with the masked prefix unpipelined ("peel": run once for run7/, never won, and
removed from triton_bwd afterwards; this script now times "one" and "two"). bf16, 32 q / 8 kv heads, causal,
block 128, random lists, first config (no autotuning), launch order by head_dim. Writes walk_ab.json to $OUT."""
import json
import os

import torch

from patchattn.bench.kernel import lists_at_density, rel_err, time_ms
from patchattn.kernels import blocksparse as bs
from patchattn.kernels.blocksparse import triton_bwd

Hq, Hkv, blk = 32, 8, 128
rows = []
for D in (128, 64):
    for T in (16384, 65536):
        q, k, v, d_out = (torch.randn(1, h, T, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv, Hq))
        for dens in (0.5, 0.1, 0.02):
            idx, cnt = lists_at_density(bs, Hkv, T, blk, dens, "cuda")
            opts = bs.Options(blk, blk, True, D ** -0.5, None)
            out, lse = bs.block_sparse_attention(q, k, v, idx, cnt, block_q=blk, block_k=blk, return_lse=True)
            fwd = time_ms(lambda: bs.block_sparse_attention(q, k, v, idx, cnt, block_q=blk, block_k=blk,
                                                            return_lse=True))
            grads = {}
            for walk in ("one", "two"):
                triton_bwd.DKDV_WALK = walk

                def bwd():
                    return triton_bwd.backward(d_out, q, k, v, out, lse, idx, cnt, opts, None, None, None, None,
                                               None, mode="split")
                t = time_ms(bwd)
                grads[walk] = bwd()
                err = max(rel_err(a, b) for a, b in zip(grads[walk], grads["one"]))
                rows.append(dict(D=D, T=T, density=dens, walk=walk, bwd_ms=t, fwd_ms=fwd, bwd_fwd=t / fwd,
                                 max_rel_diff=err))
                print(json.dumps(rows[-1]), flush=True)
            triton_bwd.DKDV_WALK = "one"
            del grads, out, lse
json.dump(rows, open(os.path.join(os.environ.get("OUT", "bench/kernel/delta_d64"), "walk_ab.json"), "w"), indent=1)
