"""Shared set-up of the merge_walks sweeps: one decode query per sequence against L layers of 128k-key caches
(each layer its own cache), and per-layer times of graphs that hold 1 or L layers."""
import torch

from patchattn.bench.kernel import graph_ms
from patchattn.kernels import blocksparse as bs

T, D, L = 131072, 128, 8


def layers(B):
    """(q, caches, ours_us(idx, cnt, block, n_layers), sdpa_us(n_layers)): microseconds per layer, graphed."""
    q = torch.randn(B, 32, 1, D, device="cuda", dtype=torch.bfloat16)
    caches = [tuple(torch.randn(B, 8, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)) for _ in range(L)]

    def ours_us(idx, cnt, blk, n_layers):
        return graph_ms(lambda: [bs.block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=blk)
                                 for k, v in caches[:n_layers]][-1]) / n_layers * 1000

    def sdpa_us(n_layers):
        return graph_ms(lambda: [torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                                 for k, v in caches[:n_layers]]) / n_layers * 1000

    return q, caches, ours_us, sdpa_us
