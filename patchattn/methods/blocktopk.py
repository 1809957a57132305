"""``blocktopk`` — block top-k attention (Kinetics' block top-k; the routing of MoBA and BiFormer).

Keys are mean-pooled per block, queries per query block (and over the heads of a GQA group, so the group
shares one selection and reads each KV block once); each query block keeps the ``top_k`` best-scoring key
blocks of its causal past, plus the sink block(s) and its ``local_blocks`` nearest blocks.  Recomputed on every
call, so decoding re-selects as the cache grows (Kinetics selects per decode step, too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import option
from ..masks import BlockGeometry, causal_allowed
from ..registry import register_method
from ._sparse import SparseConfig, run_block_sparse


@dataclass(kw_only=True)
class BlockTopKConfig(SparseConfig):
    top_k: int = option(12, "content-selected key blocks per query block", min=0)
    sink_blocks: int = option(1, "initial blocks always read", min=0)
    local_blocks: int = option(2, "nearest blocks always read (includes the diagonal block)", min=1)

    DENSE_EQUIVALENT: ClassVar[dict] = {"top_k": 1 << 30}


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, H, ceil(T / block), D]`` mean over each block's real (unpadded) rows."""
    b, h, t, d = x.shape
    n = -(-t // block)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block - t))
    sums = padded.view(b, h, n, block, d).sum(dim=3)
    counts = torch.full((n,), float(block), device=x.device)
    counts[-1] = t - (n - 1) * block
    return sums / counts[:, None]


def forced_blocks(g: BlockGeometry, sink_blocks: int, local_blocks: int, device=None) -> torch.Tensor:
    """``[NQ, NK]`` sink and local blocks, read whatever their score."""
    distance = g.diagonal_block(device)[:, None] - g.key_blocks(device)
    return (g.key_blocks(device) < sink_blocks) | ((distance >= 0) & (distance < local_blocks))


def select_top_k(g: BlockGeometry, query, key, state) -> torch.Tensor:
    config = state.config
    groups = query.shape[1] // key.shape[1]
    q_means = block_means(query, g.block_q)
    q_means = q_means.view(q_means.shape[0], key.shape[1], groups, *q_means.shape[2:]).mean(dim=2)
    scores = q_means @ block_means(key, g.block_k).transpose(-1, -2)  # [B, Hkv, NQ, NK]
    allowed = causal_allowed(g, query.device)
    forced = forced_blocks(g, config.sink_blocks, config.local_blocks, query.device) & allowed
    scores = scores.masked_fill(~allowed | forced, float("-inf"))
    k = min(config.top_k, g.n_k)
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        top = scores.topk(k, dim=-1)
        chosen.scatter_(-1, top.indices, torch.isfinite(top.values))
    return chosen | forced


@register_method(
    "blocktopk",
    config=BlockTopKConfig,
    category="sparse",
    families=("llm", "lvlm"),
    patterns=("causal-self",),
    paper="Sadhukhan et al., Kinetics: Rethinking Test-Time Scaling Laws (block top-k attention), arXiv 2506.05333; "
    "routing as in MoBA (arXiv 2502.13189)",
)
def blocktopk_attention(module, query, key, value, attention_mask, *, scaling=None, **kwargs):
    """Top-k key blocks per query block by mean-pooled scores, plus sink and local blocks."""
    return run_block_sparse(module, query, key, value, attention_mask, scaling=scaling, select=select_top_k,
                            static=False, **kwargs)
