# Run from the repository root on a CUDA GPU: PYTHONPATH=. python3 bench/kernel/backward_ab/host_fwdbwd.py
"""Where a short forward+backward spends its time: 16k tokens, 2% of blocks, d128, 32/8 heads (the point where ours
trails FlexAttention eagerly). Prints the GPU time of each kernel (torch.profiler), the eager wall time per step, the
same step replayed from a CUDA graph, and the host functions that take the time (cProfile)."""
import cProfile
import pstats

import torch

from patchattn.bench.kernel import loop_ms, random_causal_lists
from patchattn.kernels import blocksparse as bs

T, D, Hq, Hkv, blk = 16384, 128, 32, 8, 128
q, k, v = (torch.randn(1, h, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (Hq, Hkv, Hkv))
d_out = torch.randn(1, Hq, T, D, device="cuda", dtype=torch.bfloat16)
idx, cnt = random_causal_lists(bs, Hkv, T, blk, 0.02, "cuda")


def step():
    out = bs.block_sparse_attention(q, k, v, idx, cnt, block_q=blk, block_k=blk)
    return torch.autograd.grad(out, (q, k, v), d_out)


def wall_ms(fn):
    return loop_ms(fn, calls=200, warmup=20)


print(f"eager fwd+bwd: {wall_ms(step):.3f} ms per step")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(20):
        step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
stream = torch.cuda.Stream()
stream.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(stream):
    for _ in range(3):
        step()
torch.cuda.current_stream().wait_stream(stream)
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    step()
print(f"CUDA-graph replay fwd+bwd: {wall_ms(graph.replay):.3f} ms per step")
prof = cProfile.Profile()
prof.enable()
for _ in range(100):
    step()
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(25)
