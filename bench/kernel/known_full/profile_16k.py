# On a CUDA GPU, from the repository root: PYTHONPATH=. python3 bench/kernel/known_full/profile_16k.py > profile_16k.log
"""Per-kernel GPU time of one fwd+bwd at 16k (head_dim 128, 2% and 10% random lists), ours and FlexAttention on the
same masks (torch.profiler, 20 calls after warm-up): which pass carries the gap that the graphed timings show."""
import torch
from torch.profiler import ProfilerActivity, profile

from patchattn.bench.kernel import flex_block_mask, lists_at_density
from patchattn.kernels import blocksparse as bs

T, blk, Hq, Hkv, D = 16384, 128, 32, 8, 128
flex = torch.compile(__import__("torch.nn.attention.flex_attention", fromlist=["x"]).flex_attention, dynamic=False)
q, k, v = (torch.randn(1, h, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (Hq, Hkv, Hkv))
d_out = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16)
for density in (0.02, 0.1):
    idx, cnt = lists_at_density(bs, Hkv, T, blk, density, "cuda")
    mask = flex_block_mask(idx, cnt, T, blk, Hq)
    for name, fn in (("ours", lambda: torch.autograd.grad(
            bs.block_sparse_attention(q, k, v, idx, cnt, block_q=blk, block_k=blk), (q, k, v), d_out)),
                     ("flex", lambda: torch.autograd.grad(flex(q, k, v, block_mask=mask, enable_gqa=True), (q, k, v),
                                                          d_out))):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
        print(f"== {name}, density {density}")
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
            if e.device_time_total > 0:
                print(f"  {e.key[:60]:60s} {e.device_time_total / 20:9.1f} us/step  calls/step {e.count / 20:.0f}")
