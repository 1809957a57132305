"""Where the host time of one decode call goes (cProfile over 200 calls), on a CUDA machine."""
import cProfile
import pstats
import sys
import time

import torch

sys.path.insert(0, "patchattn/bench")
from kernel import _blocksparse, random_decode_lists  # noqa: E402

bs = _blocksparse()
q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(8, 8, 32768, 128, device="cuda", dtype=torch.bfloat16)
idx, cnt = random_decode_lists(8, 8, 32768, 128, 0.05, "cuda")


def call():
    return bs.block_sparse_attention(q, k, k, idx, cnt, block_q=16, block_k=128)


for _ in range(20):
    call()
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(200):
    call()
torch.cuda.synchronize()
print(f"host+device per decode call: {(time.perf_counter() - t) / 200 * 1e6:.1f} us")
prof = cProfile.Profile()
prof.enable()
for _ in range(200):
    call()
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(14)
