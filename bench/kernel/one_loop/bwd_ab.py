# Run from the repository root on a CUDA GPU: PATCHATTN_AUTOTUNE=0 PYTHONPATH=. python3 bench/kernel/one_loop/bwd_ab.py
"""Backward A/B: one loop per list vs a loop per stretch (split mode, fixed first config), H200."""
import json, os
import torch
from patchattn.bench.kernel import lists_at_density, time_ms, rel_err
from patchattn.kernels import blocksparse as bs
from patchattn.kernels.blocksparse import triton_bwd

Hq, Hkv, D, blk = 32, 8, 128, 128
rows = []
for T in (16384, 65536):
    q, k, v, d_out = (torch.randn(1, h, T, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv, Hq))
    for dens in (1.0, 0.5, 0.1, 0.02):
        idx, cnt = lists_at_density(bs, Hkv, T, blk, dens, "cuda")
        opts = bs.Options(blk, blk, True, D ** -0.5, None)
        bs.DENSE_FALLBACK = False
        fwd = time_ms(lambda: bs.block_sparse_attention(q, k, v, idx, cnt, block_q=blk, block_k=blk, return_lse=True))
        out, lse = bs.block_sparse_attention(q, k, v, idx, cnt, block_q=blk, block_k=blk, return_lse=True)
        bs.DENSE_FALLBACK = True
        grads = {}
        for one in (False, True):
            triton_bwd.BWD_ONE_LOOP = one
            bwd = lambda: triton_bwd.backward(d_out, q, k, v, out, lse, idx, cnt, opts, None, None, None, None, None,
                                              mode="split")
            t = time_ms(bwd)
            grads[one] = bwd()
            rows.append(dict(T=T, density=dens, one_loop=one, bwd_ms=t, fwd_ms=fwd, bwd_fwd=t / fwd))
            print(json.dumps(rows[-1]), flush=True)
        err = max(rel_err(a, b) for a, b in zip(grads[True], grads[False]))
        print("max rel diff one vs three loops", err, flush=True)
        rows[-1]["max_rel_diff_vs_other"] = err
json.dump(rows, open(os.path.join(os.environ.get("OUT", "bench/kernel/one_loop"), "bwd_ab.json"), "w"), indent=1)
