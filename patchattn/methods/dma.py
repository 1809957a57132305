"""``dma`` — Trainable Dynamic Mask Attention: a learned key bias from the values picks each query's keys.

Shi et al., "Trainable Dynamic Mask Sparse Attention", arXiv 2508.02124; code: flash-dmattn (Doge models).

Per KV head ``h`` every key ``j`` gets a content-aware bias from its token's value vectors (all KV heads concatenated):
``delta_j = dt_proj(V_j)`` (a linear map to one scalar per KV head) and ``b_j = A_h * softplus(delta_j)`` with a
learnable ``A_h`` (init 0, as the paper's code: the bias starts at exactly 0).  Each query keeps the ``window`` keys
of its causal past with the largest (detached) score ``b_j + recency * j / window`` and attends
``softmax(q k^T * scale + b + mask) V``; the bias is a logit term, so ``dt_proj`` and ``A`` learn through it.  The query heads of a GQA group share their KV head's bias
and mask.  ``window >= length`` is dense attention plus the bias (exactly dense while ``A = 0``).

Recency (a deviation for retrofits; ``recency=0`` is the paper's ranking).  A top-k ranking does not see the scale
of ``A``: with the paper's bias-only score, a freshly patched model (``A = 0``, every bias equal, ties to the more
recent key) is a sliding window, but after the first optimiser step (``A ~ 1e-4``) the mask is the ranking of
``softplus(dt_proj(V))`` alone -- ``window`` content-picked keys instead of the recent ones -- and a pretrained model's
loss jumps (SmolLM2, window 128 at 512 tokens: 2.80 at ``A = 0``, 4.76 at ``A = 1e-6``).  The paper trains from
scratch, where that does not matter.  The recency term ``recency * j / window`` (per key, so the kept set of a key
still only shrinks) makes the untrained mask the sliding window and lets the bias move it continuously: a key kept
past the window must out-score the later keys by ``recency`` logits per window of age.

On the engine.  Because the bias belongs to the key, the kept set of a key only shrinks as queries move on: key
``j`` is kept by the queries ``j <= i < until_j``, ``until_j`` being the position of the ``window``-th key that
beats it (``kept_until``).  Query block ``c`` therefore reads key block ``n <= c`` iff some key of ``n`` is still
kept at the block's first row; the tiles where a key leaves the window inside the block are partial tiles
(``tile_masks``: ``row < until_key``), the rest whole tiles, so the kernel is exact at token level and skips the
blocks no query of the block keeps.  The bias is the engine's ``col_bias``.  The engine's Triton backward has no
gradient for ``col_bias``; when the bias needs one (training), the call runs the engine's torch backend (block
lists, autograd through the reference), which is slower but still skips the masked blocks.  Inference (no grad) runs
Triton.  ``kept_until`` ranks the keys once (a sort) and finds, for every prefix of positions, the
``window``-th best rank in it (a wavelet matrix, all prefixes at once): ``O(T log T)`` time and ``O(T)`` memory per
head, the same ``until`` as comparing every pair of keys (design note 58).  Only the partial tiles are materialised
(``[P, block, block]`` bool): few for a window-like mask, but up to every listed tile for a content-picked one.

Trainable state: ``dt_proj`` (``[Hkv, Hkv * head_dim]``, ``N(0, init_std)`` from ``seed`` and the layer) and ``a``
(``[Hkv]``, zeros) are ``nn.Parameter`` s of the module's ``PatchState`` (names contain ``.patchattn.``), saved with a
LoRA adapter by the trainer and loaded back by ``patchattn.load(..., adapter=...)``.  Sliding-window layers and
``dense_layers`` run the model's own attention (no bias).  ``state.stats['density']``: fraction of the causal
(query, key) pairs kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MethodConfig, option
from ..kernels.blocksparse import block_sparse_attention, blocks_from_mask
from ..registry import register_method
from ..state import PatchState
from ._heads import head_counts
from ._rows import run_by_rows
from ._sparse import dense_call, record_dense_call, sparse_reason

PAPER = "Shi et al., Trainable Dynamic Mask Sparse Attention, arXiv 2508.02124 (code: flash-dmattn)"


@dataclass(kw_only=True)
class DMAConfig(MethodConfig):
    window: int = option(2048, "keys kept per query: the top-window of its causal past by the learned key bias "
                         "(Doge config: 2048)", min=1)
    block_size: int = option(64, "query/key block size of the kernel's block lists", choices=(16, 32, 64, 128))
    dense_layers: list = option([], "layer indices that stay dense", min=0, index="layer")  # noqa: RUF009
    init_std: float = option(0.02, "std of dt_proj's initial weights (A starts at 0, so the bias starts at 0)",
                             min=0.0)
    seed: int = option(0, "seed of dt_proj's initialisation", min=0)
    recency: float = option(1.0, "selection score b_j + recency * j / window (j: key position): a key must beat a "
                            "later one by `recency` logits per window of age to stay kept; > 0 makes the untrained "
                            "mask a sliding window that the learned bias bends gradually (0: the paper's bias-only "
                            "ranking, whose mask jumps to a content ranking as soon as A leaves 0)", min=0.0)

    # Every key kept; the bias is 0 until A is trained.
    DENSE_EQUIVALENT: ClassVar[dict] = {"window": 1 << 30}


def make_dma_state(module, config: DMAConfig, layer_index, role, context) -> PatchState:
    """The layer's ``dt_proj`` and ``a`` (deterministic from ``seed`` and the layer)."""
    _, kv_heads, head_dim = head_counts(module)
    state = PatchState(config, layer_index, role, context)
    device = next(module.parameters()).device
    gen = torch.Generator().manual_seed(config.seed * 100_003 + layer_index)
    weight = torch.randn(kv_heads, kv_heads * head_dim, generator=gen) * config.init_std
    state.dt_proj = nn.Parameter(weight.to(device))
    state.a = nn.Parameter(torch.zeros(kv_heads, device=device))
    return state


def key_bias(value: torch.Tensor, dt_proj: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """fp32 ``[B, Hkv, Tk]``: ``A_h * softplus(dt_proj(V_j))`` per key (V_j: the token's values of every KV head)."""
    batch, heads, length, dim = value.shape
    flat = value.transpose(1, 2).reshape(batch, length, heads * dim).float()
    delta = flat @ dt_proj.float().t()  # [B, Tk, Hkv]
    return (a.float() * F.softplus(delta)).transpose(1, 2)


def selection_score(bias: torch.Tensor, window: int, recency: float) -> torch.Tensor:
    """fp32 ``[B, Hkv, Tk]`` score that ranks the keys: the detached bias plus ``recency`` per ``window`` positions
    (a per-key term: for every query it ranks later keys higher by the same amount)."""
    score = bias.detach().float()
    if recency:
        pos = torch.arange(score.shape[-1], device=score.device, dtype=torch.float32)
        score = score + pos * (recency / window)
    return score


def kept_until(bias: torch.Tensor, window: int, recency: float = 0.0) -> torch.Tensor:
    """long ``[B, Hkv, Tk]``: key ``j`` is among the top-``window`` keys (by ``selection_score``, ties to the later
    key) of every query ``i`` with ``j <= i < until_j``; ``until_j`` is the position of the ``window``-th key that
    beats ``j`` (``Tk`` when fewer do).  Uses the detached bias.

    ``O(T log T)`` per head, no ``[T, T]`` comparison: with ``R_j`` the key's rank by (score, position), key ``m``
    beats ``j`` iff ``R_m > R_j``, so at least ``window`` keys of ``0..p`` beat ``j`` iff the ``window``-th largest
    rank among them, ``W(p)``, exceeds ``R_j``.  ``W`` never decreases (the prefix only grows), so ``until_j`` is the
    first ``p`` with ``W(p) > R_j``: a binary search of ``W``.  A NaN score is beaten by no key and beats none (as a
    comparison with NaN is false): its rank sits below every other key's and its ``until`` is ``Tk``."""
    batch, heads, length = bias.shape
    if window >= length:
        return torch.full_like(bias, length, dtype=torch.long)
    score = selection_score(bias, window, recency).reshape(batch * heads, length)
    ranks, nan = key_ranks(score)
    until = torch.searchsorted(prefix_kth_largest(ranks, window), ranks, right=True)
    return until.masked_fill(nan, length).view(batch, heads, length)


def key_ranks(score: torch.Tensor):
    """long ``[N, T]`` ranks ``1..`` of each row's keys by (score, position), ascending (equal scores: the later key
    ranks higher, as ``score_m == score_j and m > j`` beats ``j``), NaN scores rank 0; and the NaN mask.  ``-0.0``
    and ``0.0`` are one value (``+ 0.0``), as for ``==``."""
    rows, length = score.shape
    score = score + 0.0
    nan = score.isnan()
    order = torch.sort(score, dim=-1, stable=True).indices  # NaN sort last
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(1, length + 1, device=score.device)
                                             .expand(rows, length))
    return ranks.masked_fill(nan, 0), nan


def prefix_kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """long ``[N, T]``: the ``k``-th largest of ``values[:, :p + 1]`` at ``p`` (``-1`` while ``p + 1 < k``), for
    integer ``values`` in ``0 .. 2^L - 1`` (``L = bit_length(T)``).

    A wavelet matrix, built and queried together, all prefixes at once: level by level from the top bit, each row's
    values are split stably into those with the bit clear, then set, and each prefix query ``[start, end)`` follows
    the side that holds its ``k``-th largest, which fixes one bit of the answer.  ``L`` levels of prefix sums and
    gathers over ``[N, T]``: ``O(T log T)`` work and ``O(T)`` memory, no host sync."""
    rows, length = values.shape
    device = values.device
    pos = torch.arange(length, device=device)
    start = torch.zeros(rows, length, dtype=torch.long, device=device)
    end = (pos + 1).expand(rows, length).contiguous()
    rank = torch.full_like(start, k - 1)  # 0-based, from the largest
    answer = torch.zeros_like(start)
    seq = values
    for level in reversed(range(max(1, length.bit_length()))):
        bit = (seq >> level) & 1
        ones = F.pad(bit.cumsum(-1), (1, 0))  # [N, T + 1]: set bits in seq[:, :i]
        zeros = length - ones[:, -1:]
        ones_start, ones_end = ones.gather(-1, start), ones.gather(-1, end)
        set_count = ones_end - ones_start
        high = rank < set_count  # the k-th largest has this bit set
        answer |= high.long() << level
        start = torch.where(high, zeros + ones_start, start - ones_start)
        end = torch.where(high, zeros + ones_end, end - ones_end)
        rank = torch.where(high, rank, rank - set_count)
        dest = torch.where(bit.bool(), zeros + ones[:, :-1], pos - ones[:, :-1])
        seq = torch.empty_like(seq).scatter_(-1, dest, seq)
    return answer.masked_fill(pos < k - 1, -1)


def dynamic_mask_lists(until: torch.Tensor, first_block: int, n_q: int, block: int, kv_len: int):
    """Block lists and partial tiles for query blocks aligned on key blocks (query block ``m`` holds the positions of
    key block ``first_block + m``): ``(kv_indices, kv_counts, tile_masks, tile_mask_ids)``, per KV head.  A listed
    tile is whole when every key of it outlives the block's last row (``min until > last row``); only the partial
    ones are materialised (``[P, block, block]``)."""
    batch, heads, _ = until.shape
    device = until.device
    n_k = math.ceil(kv_len / block)
    # Keys past the end never bound anything (the engine hides them): a large "until".
    padded = F.pad(until, (0, n_k * block - kv_len), value=1 << 40).view(batch, heads, n_k, block)
    current = first_block + torch.arange(n_q, device=device)  # [NQ] key block of each query block
    first_row = current * block
    reads = (torch.arange(n_k, device=device)[None] <= current[:, None]) \
        & (padded.amax(-1)[:, :, None, :] > first_row[None, None, :, None])  # [B, H, NQ, NK]
    kv_indices, kv_counts = blocks_from_mask(reads)
    width = kv_indices.shape[-1]
    soonest = padded.amin(-1).gather(2, kv_indices.long().flatten(2)).view(batch, heads, n_q, width)
    listed = torch.arange(width, device=device) < kv_counts[..., None]
    partial = listed & (soonest <= (first_row + block - 1)[:, None])  # [B, H, NQ, K]
    tile_ids = torch.where(partial, partial.flatten().cumsum(0).view(partial.shape) - 1, -1).to(torch.int32)
    b_i, h_i, q_i, r_i = partial.nonzero(as_tuple=True)  # row-major: the order of the tile ids
    keys = padded[b_i, h_i, kv_indices[b_i, h_i, q_i, r_i].long()]  # [P, block]: until of each key of the tile
    rows = first_row[q_i, None] + torch.arange(block, device=device)  # [P, block]
    return kv_indices, kv_counts, rows[:, :, None] < keys[:, None, :], tile_ids


def dynamic_mask_attention(state, query, key, value, scale: float, softcap: float | None) -> torch.Tensor:
    """DMA on unpadded rows (queries: the last ``Tq`` of ``Tk`` positions): ``[B, Hq, Tq, D]``."""
    config = state.config
    block = config.block_size
    q_len, kv_len = query.shape[2], key.shape[2]
    bias = key_bias(value, state.dt_proj, state.a)
    until = kept_until(bias, config.window, config.recency)
    offset = kv_len - q_len
    pad = offset % block  # align query blocks on key blocks: a few leading rows, dropped after
    padded_q = F.pad(query, (0, 0, pad, 0)) if pad else query
    n_q = math.ceil((q_len + pad) / block)
    kv_indices, kv_counts, tile_masks, tile_ids = dynamic_mask_lists(until, (offset - pad) // block, n_q, block,
                                                                     kv_len)
    backend = config.backend
    if torch.is_grad_enabled() and bias.requires_grad:
        backend = "torch"  # the Triton backward has no col_bias gradient
    out = block_sparse_attention(padded_q, key, value, kv_indices, kv_counts, block_q=block, block_k=block,
                                 causal=True, scale=scale, softcap=softcap, col_bias=bias, backend=backend,
                                 tile_masks=tile_masks, tile_mask_ids=tile_ids)
    state.record(density=_kept_share(until, offset, kv_len))
    return out[:, :, pad:]


def _kept_share(until: torch.Tensor, offset: int, kv_len: int) -> torch.Tensor:
    """Fraction of the causal (query, key) pairs of the queries ``offset..kv_len-1`` that are kept."""
    pos = torch.arange(kv_len, device=until.device)
    kept = (until.clamp(max=kv_len) - pos.clamp(min=offset)).clamp(min=0).sum(-1).float()
    causal = sum(range(offset + 1, kv_len + 1))
    return (kept / causal).mean()


@register_method(
    "dma",
    config=DMAConfig,
    category="other",
    families=("llm", "lvlm"),
    needs_finetune=True,
    patterns=("causal-self",),
    paper=PAPER,
    make_state=make_dma_state,
)
def dma_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """Dynamic mask attention: each query keeps the top-window keys by a learned value-derived bias."""
    state = module.patchattn
    q_len, kv_len = query.shape[2], key.shape[2]
    reason, spans = sparse_reason(state, attention_mask, q_len, kv_len, kwargs)
    if reason is not None:
        record_dense_call(state, "dma", reason, q_len, kv_len, kwargs)
        return dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if dropout:
        raise NotImplementedError("patchattn dma: attention dropout is not supported (the engine has none); set the "
                                  "model's attention dropout to 0")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling

    def run(q, k, v):  # unpadded rows: a row's keys are its own
        return dynamic_mask_attention(state, q, k, v, scale, kwargs.get("softcap")).transpose(1, 2)

    if spans is None:
        return run(query, key, value), None
    return run_by_rows(state, query, key, value, spans, run), None
