# Run from the repository root on a CUDA GPU: PATCHATTN_AUTOTUNE=0 PYTHONPATH=. python3 bench/kernel/backward_ab/bwd_ab.py
"""Backward alone, split mode, side by side: the previous layout (dQ pass after dK/dV, transposed lists rebuilt every
call) against the transposed-list cache, next to FlexAttention's backward on the
same block mask (its BlockMask carries the transposed indices, built before timing). bf16, 32 q / 8 kv heads, block
128, the first fitting config (no autotuning) so only the layout differs. Writes bwd_ab.json to $OUT (or here)."""
import json
import os

import torch

from patchattn.bench.kernel import flex_block_mask, lists_at_density, rel_err, time_ms
from patchattn.kernels import blocksparse as bs
from patchattn.kernels.blocksparse import triton_bwd

# run2/bwd_ab.json also has a "cache_2streams" row per point: the dQ pass on a second CUDA stream beside the dK/dV
# pass (a BWD_STREAMS flag, removed after this run: within +-3% of one stream everywhere, no gain to keep it for).
VARIANTS = {"rebuild_1stream": dict(CACHE_TRANSPOSED=False),
            "cache_1stream": dict(CACHE_TRANSPOSED=True)}
Hq, Hkv, blk = 32, 8, 128
torch._dynamo.config.cache_size_limit = 64
flex = torch.compile(torch.nn.attention.flex_attention.flex_attention, dynamic=False)
rows = []
for D in (128, 64):
    for T in (16384, 65536):
        q, k, v, d_out = (torch.randn(1, h, T, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv, Hq))
        for dens in (1.0, 0.5, 0.1, 0.02):
            idx, cnt = lists_at_density(bs, Hkv, T, blk, dens, "cuda")
            opts = bs.Options(blk, blk, True, D ** -0.5, None)
            bs.DENSE_FALLBACK = False
            fwd = time_ms(lambda: bs.block_sparse_attention(q, k, v, idx, cnt, block_q=blk, block_k=blk,
                                                            return_lse=True))
            out, lse = bs.block_sparse_attention(q, k, v, idx, cnt, block_q=blk, block_k=blk, return_lse=True)
            bs.DENSE_FALLBACK = True
            grads = {}
            for name, flags in VARIANTS.items():
                saved = {f: getattr(triton_bwd, f) for f in flags}
                for f, val in flags.items():
                    setattr(triton_bwd, f, val)
                try:
                    def bwd():
                        return triton_bwd.backward(d_out, q, k, v, out, lse, idx, cnt, opts, None, None, None, None,
                                                   None, mode="split")
                    t = time_ms(bwd)
                    grads[name] = bwd()
                finally:
                    for f, val in saved.items():
                        setattr(triton_bwd, f, val)
                err = max(rel_err(a, b) for a, b in zip(grads[name], grads["rebuild_1stream"]))
                rows.append(dict(D=D, T=T, density=dens, impl=name, bwd_ms=t, fwd_ms=fwd, bwd_fwd=t / fwd,
                                 max_rel_diff=err))
                print(json.dumps(rows[-1]), flush=True)
            if T <= 16384:
                mask = flex_block_mask(idx, cnt, T, blk, Hq)
                qf, kf, vf = (t.clone().requires_grad_(True) for t in (q, k, v))
                t_fwd = time_ms(lambda: flex(qf, kf, vf, block_mask=mask, enable_gqa=True))
                o = flex(qf, kf, vf, block_mask=mask, enable_gqa=True)
                t = time_ms(lambda: torch.autograd.grad(o, (qf, kf, vf), d_out, retain_graph=True))
                flex_grads = torch.autograd.grad(o, (qf, kf, vf), d_out)
                err = max(rel_err(a, b) for a, b in zip(grads["cache_1stream"], flex_grads))
                rows.append(dict(D=D, T=T, density=dens, impl="flex", bwd_ms=t, fwd_ms=t_fwd, bwd_fwd=t / t_fwd,
                                 max_rel_diff=err))
                print(json.dumps(rows[-1]), flush=True)
                del o, flex_grads
            del grads, out, lse
json.dump(rows, open(os.path.join(os.environ.get("OUT", "bench/kernel/backward_ab"), "bwd_ab.json"), "w"), indent=1)
