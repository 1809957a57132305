# Run from the repository root on a CUDA GPU, under Nsight Compute (bench/kernel/delta_d64/run3.sh):
#   PATCHATTN_AUTOTUNE=0 PYTHONPATH=. ncu ... python3 bench/kernel/delta_d64/ncu_bwd.py
"""One backward of ours (split mode: the dQ pass, then dK/dV) and one of FlexAttention on the same block mask,
bf16, 16k tokens, 32 q / 8 kv heads, head_dim 128, causal, 50% of the blocks: the kernels for ncu to read."""
import torch

from patchattn.bench.kernel import flex_block_mask, lists_at_density
from patchattn.kernels import blocksparse as bs
from patchattn.kernels.blocksparse import triton_bwd

T, D, Hq, Hkv, blk, density = 16384, 128, 32, 8, 128, 0.5
q, k, v, d_out = (torch.randn(1, h, T, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv, Hq))
idx, cnt = lists_at_density(bs, Hkv, T, blk, density, "cuda")
opts = bs.Options(blk, blk, True, D ** -0.5, None)
out, lse = bs.block_sparse_attention(q, k, v, idx, cnt, block_q=blk, block_k=blk, return_lse=True)
triton_bwd.backward(d_out, q, k, v, out, lse, idx, cnt, opts, None, None, None, None, None, mode="split")
torch.cuda.synchronize()

flex = torch.compile(torch.nn.attention.flex_attention.flex_attention, dynamic=False)
mask = flex_block_mask(idx, cnt, T, blk, Hq)
qf, kf, vf = (t.clone().requires_grad_(True) for t in (q, k, v))
o = flex(qf, kf, vf, block_mask=mask, enable_gqa=True)
torch.autograd.grad(o, (qf, kf, vf), d_out)
torch.cuda.synchronize()
print("done")
