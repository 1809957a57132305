"""``landmark`` — Landmark Attention: a landmark key per block gates the block; top-k blocks retrieved at inference.

Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers" (NeurIPS 2023),
arXiv 2305.16300; code: epfml/landmark-attention.

Grouped softmax (the paper's training attention).  Keys fall in blocks of ``block_size`` tokens.  A query at position
``p`` in block ``c`` attends the tokens of its *local* blocks (``c - local_blocks + 1 .. c``; the paper: the current
block) directly, and every earlier block ``n`` through that block's landmark: one softmax over {local tokens} and
{landmarks of the earlier blocks} gives each local token its weight and each block ``n`` a weight ``P(n)``, which is
shared among the block's tokens by a softmax restricted to the block (``P(token | n)``).  Landmarks carry no value.

Landmark keys (deviation: no token is inserted).  The paper appends a ``<landmark>`` token after every block and
trains its key.  Here the token sequence is unchanged and each block's landmark key is *derived* from its keys:
a learned per-KV-head attention pooling ``L_n = sum_j softmax_j(v_j . u_h) k_j`` of the block's (post-RoPE) keys,
weighted by the values (RoPE-free: pooling weights read from rotated keys would depend on absolute positions, so a
left-padded row would differ from the row alone), plus a learned per-head logit offset ``o_h``: the landmark logit is ``q . L_n * scale + o_h``.  ``u`` starts at 0
(mean pooling) and ``o`` at ``log(block_size)`` (Jensen: ``log sum_j exp(s_j) >= log(block) + mean_j s_j``, so a
freshly patched model starts near the block's true softmax mass).  Only complete blocks have a landmark (the block
holding the query is always local), so a landmark never changes once its block is full, and the tokens stay where
the model put them (no landmark positions to skip, no change to the tokenizer or to generation).

Inference (``model.eval()``).  Each query and each query head retrieves the ``top_k`` earlier blocks with the
highest landmark logits (paper's ``run_test``: 5) and runs the same grouped softmax over those blocks + its local
blocks (non-retrieved landmarks leave the softmax).  With ``top_k`` >= the number of blocks it is the training
attention exactly (tested).  Deviation: retrieved blocks keep their own positions (the keys in the cache are
rotated already); the paper re-places them just before the local context to extrapolate beyond its training length.
In training mode (``train_all_blocks``, default) every earlier block is gated, as the paper trains.

On the kernels.  Query blocks are aligned on key blocks (a few leading query rows are padded in when a call starts
mid-block, and dropped), so a query block shares its local blocks and candidates.  The landmark logits are made one
chunk of query blocks at a time and reduced there to each row's picks and each query block's list: the union of
its rows' retrieved blocks per head (``retrieve_blocks``; memory ``O(T * top_k + T^2 / block^2)`` per head, not
``O(T^2 / block)``; design note 58).  Inference on Triton then runs one launch of ``kernels.landmark``
(``_fused_landmark_attention``, design note 61): per query block, an online softmax over its local keys and its
list's blocks, each block's own softmax output weighted by the row's gate (the landmark logit where the row
retrieved the block, ``-inf`` otherwise) -- exactly the grouped softmax, with the work of the listed blocks only.
The torch backend keeps the engine path (``_per_rank_landmark_attention``, the fused path's oracle): one call for
the local blocks with its log-sum-exp, then one call per *rank* of the lists, mixed by ``mix_weights``.  Calls that
need gradients (training) compute the same grouped softmax as one weight matrix per chunk of query rows
(``grouped_landmark_training``: operators independent of the number of blocks, no host sync); the fused kernel is
forward only.

Trainable state: ``landmark_query`` (``[Hkv, head_dim]`` (the values' head_dim), zeros) and ``landmark_offset`` (``[Hkv]``,
``log(block_size)``) are ``nn.Parameter`` s of the module's ``PatchState`` (names contain ``.patchattn.``): saved with
a LoRA adapter and loaded back by ``patchattn.load(..., adapter=...)``.  ``local_blocks`` covering the whole input
is the model's own causal attention (``DENSE_EQUIVALENT``).  Sliding-window layers and ``dense_layers`` stay the
model's own.  ``state.stats['density']``: fraction of the causal key blocks each query reads (local + retrieved).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import MethodConfig, option
from ..kernels.blocksparse import block_sparse_attention, blocks_from_mask
from ..kernels.landmark import landmark_block_attention, uses_triton
from ..registry import register_method
from ..state import PatchState
from ._heads import head_counts
from ._rows import run_by_rows
from ._sparse import dense_call, record_dense_call, sparse_reason

PAPER = ("Mohtashami & Jaggi, Landmark Attention: Random-Access Infinite Context Length for Transformers "
         "(NeurIPS 2023), arXiv 2305.16300")


@dataclass(kw_only=True)
class LandmarkConfig(MethodConfig):
    block_size: int = option(64, "tokens per landmark block (paper, LLaMA: 63 tokens + the landmark)",
                             choices=(16, 32, 64, 128))
    top_k: int = option(5, "earlier blocks retrieved per query and head at inference (paper's run_test: 5)", min=0)
    local_blocks: int = option(1, "blocks attended directly: the query's own block and the ones just before it "
                               "(paper: the current block)", min=1)
    train_all_blocks: bool = option(True, "in training mode gate every earlier block (the paper's grouped softmax); "
                                    "False: retrieve top_k in training too")
    dense_layers: list = option([], "layer indices that stay dense", min=0, index="layer")  # noqa: RUF009

    # Every block local: plain causal softmax.
    DENSE_EQUIVALENT: ClassVar[dict] = {"local_blocks": 1 << 30}


def make_landmark_state(module, config: LandmarkConfig, layer_index, role, context) -> PatchState:
    """The layer's landmark pooling query (zeros: mean pooling) and logit offset (``log(block_size)``)."""
    _, kv_heads, head_dim = head_counts(module)
    state = PatchState(config, layer_index, role, context)
    device = next(module.parameters()).device
    state.landmark_query = nn.Parameter(torch.zeros(kv_heads, head_dim, device=device))
    state.landmark_offset = nn.Parameter(torch.full((kv_heads,), math.log(config.block_size), device=device))
    return state


def landmark_keys(key: torch.Tensor, value: torch.Tensor, pool_query: torch.Tensor, block: int) -> torch.Tensor:
    """fp32 ``[B, Hkv, NC, D]``: each complete block's landmark key ``sum_j softmax_j(v_j . u_h) k_j``.  The weights
    read the values (no RoPE), so ``q . L`` stays a function of relative positions, as every other logit is."""
    batch, heads, length, dim = key.shape
    n = length // block
    keys = key[:, :, : n * block].float().view(batch, heads, n, block, dim)
    values = value[:, :, : n * block].float().view(batch, heads, n, block, value.shape[-1])
    weights = torch.softmax(torch.einsum("bhnjd,hd->bhnj", values, pool_query.float()), dim=-1)
    return torch.einsum("bhnj,bhnjd->bhnd", weights, keys)


def landmark_logits(query, landmarks, offset, scale: float, softcap: float | None) -> torch.Tensor:
    """fp32 ``[B, Hq, Tq, NC]``: each query head's logit for each landmark (its KV head's)."""
    batch, heads, length, dim = query.shape
    kv_heads = landmarks.shape[1]
    q = query.float().view(batch, kv_heads, heads // kv_heads, length, dim)
    logits = torch.einsum("bhgtd,bhnd->bhgtn", q, landmarks).mul_(scale)  # in place: no backward reads it
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.add_(offset.float()[None, :, None, None, None])
    return logits.reshape(batch, heads, length, -1)


# Upper bound on the landmark logits (fp32) one chunk of query rows materialises at inference (and on the gate
# elements one chunk of the mix's softmax reads): the whole [B, Hq, T, T / block] was 34 GB at 128k (Llama-3-8B).
RETRIEVAL_CHUNK_SCORES = 1 << 26


def grouped_landmark_attention(state, query, key, value, scale: float, softcap: float | None,
                               top_k: int, chunk_scores: int = RETRIEVAL_CHUNK_SCORES) -> torch.Tensor:
    """The grouped softmax over local tokens and the ``top_k`` best earlier blocks per query and head, on unpadded
    rows (queries: the last ``Tq`` of ``Tk`` positions): ``[B, Hq, Tq, D]``.  Calls that need gradients run
    :func:`grouped_landmark_training`; inference runs the fused kernel (``kernels.landmark``) where the backend is
    Triton, else :func:`_per_rank_landmark_attention` (the torch engine, one call per rank of the lists)."""
    geo = _Geometry.of(state.config, query, key)
    backend = state.config.backend
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (query, key, value, state.landmark_query, state.landmark_offset))
    if needs_grad and geo.last_candidate >= 0 and top_k > 0:
        return grouped_landmark_training(state, query, key, value, scale, softcap, top_k)
    if needs_grad:
        backend = "torch"  # the Triton path's log-sum-exp has no gradient
    elif uses_triton(backend, query):
        return _fused_landmark_attention(state, geo, query, key, value, scale, softcap, top_k, chunk_scores, backend)
    return _per_rank_landmark_attention(state, query, key, value, scale, softcap, top_k, chunk_scores, backend)


@dataclass(frozen=True)
class _Geometry:
    """Query blocks aligned on key blocks: ``pad`` alignment rows in front of the queries, ``rows = Tq + pad``,
    ``n_q`` query blocks, the key block of the first (``first_block``), ``n_c`` complete key blocks, and the last
    query block's newest earlier block (``last_candidate``, < 0: nothing to retrieve)."""

    block: int
    local: int
    pad: int
    rows: int
    n_q: int
    first_block: int
    n_c: int
    last_candidate: int

    @classmethod
    def of(cls, config, query, key) -> _Geometry:
        block, local = config.block_size, config.local_blocks
        q_len, kv_len = query.shape[2], key.shape[2]
        offset = kv_len - q_len
        pad = offset % block
        n_q = math.ceil((q_len + pad) / block)
        first = (offset - pad) // block
        return cls(block, local, pad, q_len + pad, n_q, first, kv_len // block, first + n_q - 1 - local)


def _fused_landmark_attention(state, geo: _Geometry, query, key, value, scale, softcap, top_k, chunk_scores,
                              backend) -> torch.Tensor:
    """Inference in one kernel launch after the retrieval: the local blocks and every retrieved block of every row,
    mixed by the rows' gates inside the kernel (no per-rank engine call, no ``[rows, 1 + K]`` weights, no host
    read of the lists' width: it is bounded by ``min(NC, block * top_k)``).  ``[B, Hq, Tq, D]``."""
    block, local = geo.block, geo.local
    batch, heads, q_len, _ = query.shape
    device = query.device
    current = geo.first_block + torch.arange(geo.n_q, device=device)  # [NQ] key block of each query block
    reads_local = (current - (current - local + 1).clamp(min=0) + 1).float()
    kernel = {"block": block, "local_blocks": local, "scale": scale, "softcap": softcap, "backend": backend}
    if geo.last_candidate < 0 or top_k == 0:  # local blocks only: empty lists
        lists = torch.zeros(1, 1, geo.n_q, 1, dtype=torch.int32, device=device)
        no_picks = torch.zeros(batch, heads, q_len, 0, device=device)
        out = landmark_block_attention(query, key, value, lists, lists[..., 0], no_picks.long(), no_picks, **kernel)
        state.record(density=(reads_local / (current + 1)).mean())
        return out
    landmarks = landmark_keys(key, value, state.landmark_query, block)
    row_block = current.repeat_interleave(block)[:geo.rows]
    padded_q = F.pad(query, (0, 0, geo.pad, 0)) if geo.pad else query
    picks = retrieve_blocks(padded_q, landmarks, state.landmark_offset, scale, softcap, top_k, block, row_block,
                            geo.pad, local, chunk_scores)
    width = min(geo.n_c, block * min(top_k, geo.n_c))  # a query block's union holds at most this many blocks
    kv_indices, kv_counts = blocks_from_mask(picks.union, width)
    out = landmark_block_attention(query, key, value, kv_indices, kv_counts, picks.entry[:, :, geo.pad:],
                                   picks.gate[:, :, geo.pad:], **kernel)
    reads = picks.count + reads_local.repeat_interleave(block)[:geo.rows]
    state.record(density=(reads[..., geo.pad:] / (row_block[geo.pad:] + 1)).mean())
    return out


def _per_rank_landmark_attention(state, query, key, value, scale: float, softcap: float | None, top_k: int,
                                 chunk_scores: int, backend: str) -> torch.Tensor:
    """The grouped softmax through the block-sparse engine: one call for the local blocks (with its log-sum-exp),
    then one call per rank of the query blocks' lists, each piece weighted by :func:`mix_weights` and added as it
    comes.  The torch-backend inference path (bit for bit the code of design note 58) and the oracle of
    :func:`_fused_landmark_attention`.  ``[B, Hq, Tq, D]``."""
    geo = _Geometry.of(state.config, query, key)
    block, local, pad, rows = geo.block, geo.local, geo.pad, geo.rows
    device = query.device
    padded_q = F.pad(query, (0, 0, pad, 0)) if pad else query
    current = geo.first_block + torch.arange(geo.n_q, device=device)  # [NQ] key block of each query block
    blocks = torch.arange(math.ceil(key.shape[2] / block), device=device)

    def attend(kv_indices, kv_counts, return_lse=False):
        return block_sparse_attention(padded_q, key, value, kv_indices, kv_counts, block_q=block, block_k=block,
                                      causal=True, scale=scale, softcap=softcap, return_lse=return_lse,
                                      backend=backend)

    local_mask = (blocks[None] <= current[:, None]) & (blocks[None] > current[:, None] - local)
    out_local, lse_local = attend(*blocks_from_mask(local_mask[None, None]), return_lse=True)
    reads_local = (current - (current - local + 1).clamp(min=0) + 1).float()
    if geo.last_candidate < 0 or top_k == 0:
        state.record(density=(reads_local / (current + 1)).mean())
        return out_local[:, :, pad:]

    landmarks = landmark_keys(key, value, state.landmark_query, block)
    row_block = current.repeat_interleave(block)[:rows]
    picks = retrieve_blocks(padded_q, landmarks, state.landmark_offset, scale, softcap, top_k, block, row_block, pad,
                            local, chunk_scores)
    kv_indices, kv_counts = blocks_from_mask(picks.union)  # [B, Hq, NQ, K]
    weights = mix_weights(lse_local, picks, kv_indices.shape[-1], chunk_scores)  # [B, Hq, rows, 1 + K]
    out = weights[..., 0, None] * out_local.float()
    for rank in range(kv_indices.shape[-1]):  # each piece added as it comes (one [B, Hq, rows, D] at a time)
        # The block's mass enters through its landmark gate, not through its own log-sum-exp.
        out_r = attend(kv_indices[..., rank:rank + 1].contiguous(), (kv_counts > rank).to(torch.int32))
        out.add_(weights[..., rank + 1, None] * out_r.float())
    reads = picks.count + reads_local.repeat_interleave(block)[:rows]
    state.record(density=(reads[..., pad:] / (row_block[pad:] + 1)).mean())
    return out[:, :, pad:].to(query.dtype)


# Inference retrieval in chunks of query blocks --------------------------------------------------------------------
@dataclass
class Retrieved:
    """What the mix needs of each row's top-k retrieval: the union of a query block's retrieved blocks per head
    (``union``, bool ``[B, Hq, NQ, NC]``), and per row and pick (``[B, Hq, rows, k]``, ``k = min(top_k, NC)``) the
    landmark logit (``gate``) and the block's entry in its query block's list (``entry``: its rank in ``union``'s
    row, ``-1`` where the pick is not a candidate); ``count``: blocks retrieved per row (float ``[B, Hq, rows]``)."""

    union: torch.Tensor
    gate: torch.Tensor
    entry: torch.Tensor
    count: torch.Tensor


def retrieve_blocks(query, landmarks, offset, scale: float, softcap: float | None, top_k: int, block: int,
                    row_block: torch.Tensor, pad: int, local: int, chunk_scores: int) -> Retrieved:
    """Each row's ``top_k`` earlier complete blocks by landmark logit, for ``query`` ``[B, Hq, rows, D]`` aligned on
    key blocks (row ``r`` in key block ``row_block[r]``; the first ``pad`` rows retrieve nothing).  The logits are
    made one chunk of query blocks at a time (about ``chunk_scores`` a chunk) and reduced there to the rows' picks
    and their query blocks' unions: memory ``O(rows * k + NQ * NC)`` per head instead of ``O(rows * NC)``.

    Exactness: every row gets the logits, picks and ties of the whole-matrix computation, as long as the matmul
    computes a row's dot products the same whatever the number of rows it is given.  CPU BLAS does from about 8 rows
    (a matrix of 1-6 rows takes another path, whose sums differ in the last bit), so a chunk is at least two query
    blocks (>= 17 rows) and the last chunk takes the remainder rather than being a few rows alone."""
    batch, heads, rows, _ = query.shape
    n_q = math.ceil(rows / block)
    step = max(2, chunk_scores // max(1, batch * heads * block * landmarks.shape[2]))  # query blocks a chunk
    starts = list(range(0, n_q, step))
    if len(starts) > 1 and n_q - starts[-1] < step:
        starts.pop()  # the last chunk takes the remainder: no chunk of a few rows (see below)
    bounds = [m * block for m in starts] + [rows]
    parts = [_retrieve_chunk(query, landmarks, offset, scale, softcap, top_k, block, row_block, pad, local, r0, r1)
             for r0, r1 in itertools.pairwise(bounds)]
    return Retrieved(*(torch.cat(field, dim=2) for field in zip(*parts, strict=True)))


def _retrieve_chunk(query, landmarks, offset, scale, softcap, top_k, block, row_block, pad, local, r0, r1):
    """``retrieve_blocks`` for rows ``r0 .. r1`` (whole query blocks): (union, gate, entry, count).  The union is
    scattered from the picks into ``[B, Hq, blocks, NC]`` (no ``[B, Hq, rows, NC]`` pick mask), and the logits are
    masked in place (a chunk's logits are used only here)."""
    n_c = landmarks.shape[2]
    logits = landmark_logits(query[:, :, r0:r1], landmarks, offset, scale, softcap)  # [B, Hq, c, NC]
    batch, heads, length, _ = logits.shape
    candidate = torch.arange(n_c, device=query.device)[None] <= (row_block[r0:r1] - local)[:, None]  # [c, NC]
    candidate[:max(0, pad - r0)] = False  # the alignment rows retrieve nothing
    n_blocks = math.ceil(length / block)
    fill = n_blocks * block - length
    if top_k >= n_c:  # every candidate: the same for every head
        gate, pick = logits, torch.arange(n_c, device=query.device).expand(batch, heads, length, n_c)
        chosen = candidate.expand(batch, heads, length, n_c)
        union = F.pad(candidate, (0, 0, 0, fill)).view(n_blocks, block, n_c).any(1).expand(batch, heads, -1, -1)
    else:
        gate, pick = logits.masked_fill_(~candidate, float("-inf")).topk(top_k, dim=-1)
        chosen = candidate.expand(batch, heads, length, n_c).gather(-1, pick)
        slot = F.pad(torch.where(chosen, pick, n_c), (0, 0, 0, fill), value=n_c).view(batch, heads, n_blocks, -1)
        union = torch.zeros(batch, heads, n_blocks, n_c + 1, dtype=torch.bool, device=query.device)
        union = union.scatter_(-1, slot, True)[..., :n_c]  # not chosen: the dropped last column
    entries = union.cumsum(-1) - 1  # a block's place in its query block's (ascending) list
    by_block = F.pad(pick, (0, 0, 0, fill)).view(batch, heads, n_blocks, -1)
    entry = entries.gather(-1, by_block).view(batch, heads, n_blocks * block, -1)[:, :, :length]
    return union, gate, entry.masked_fill(~chosen, -1), chosen.sum(-1).float()


def mix_weights(lse_local: torch.Tensor, picks: Retrieved, width: int, chunk_scores: int) -> torch.Tensor:
    """fp32 ``[B, Hq, rows, 1 + width]``: each row's softmax over its local log-sum-exp and, for entry ``r`` of its
    query block's list, the landmark logit where the row retrieved that block (``-inf`` otherwise); chunks of rows
    (the softmax is per row)."""
    batch, heads, rows = lse_local.shape
    weights = torch.empty(batch, heads, rows, 1 + width, device=lse_local.device)
    step = max(1, chunk_scores // max(1, batch * heads * (width + 2)))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        gates = torch.full((batch, heads, r1 - r0, width + 2), float("-inf"), device=lse_local.device)
        gates[..., 0] = lse_local[:, :, r0:r1]
        entry = picks.entry[:, :, r0:r1]
        gates.scatter_(-1, torch.where(entry >= 0, entry + 1, width + 1), picks.gate[:, :, r0:r1])  # last: dropped
        weights[:, :, r0:r1] = torch.softmax(gates[..., :width + 1].contiguous(), dim=-1)
    return weights


# Training: the grouped softmax as one weight matrix per chunk of query rows (no per-block loop) ---------------------
# Upper bound on the score elements (fp32) one chunk materialises, as the engine's torch reference.
TRAINING_CHUNK_SCORES = 1 << 23


def grouped_landmark_training(state, query, key, value, scale: float, softcap: float | None,
                              top_k: int) -> torch.Tensor:
    """The grouped softmax of :func:`grouped_landmark_attention` for calls that need gradients, with a fixed number
    of operations whatever the number of blocks: each row's weight of key ``j`` is ``exp(s_j - lse)`` for a local key
    and ``exp(s_j - lse_n + g_n - lse)`` for a key of a gated earlier block ``n`` (``lse_n``: the block's own
    log-sum-exp, ``g_n``: its landmark logit, ``lse``: the log-sum-exp of the local scores and the gates), one
    ``[rows, Tk]`` matrix per chunk of rows, checkpointed (memory stays one chunk's).  ``[B, Hq, Tq, D]``."""
    config = state.config
    block, local = config.block_size, config.local_blocks
    q_len, kv_len = query.shape[2], key.shape[2]
    n_c = kv_len // block
    device = query.device
    row_block = (kv_len - q_len + torch.arange(q_len, device=device)) // block  # [Tq]
    landmarks = landmark_keys(key, value, state.landmark_query, block)
    logits = landmark_logits(query, landmarks, state.landmark_offset, scale, softcap)  # [B, Hq, Tq, NC]
    candidate = torch.arange(n_c, device=device)[None] <= (row_block - local)[:, None]  # [Tq, NC]
    if top_k >= n_c:
        chosen = candidate.expand_as(logits)
    else:
        best = logits.masked_fill(~candidate, float("-inf")).topk(top_k, dim=-1).indices
        chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, best, True) & candidate
    gates = logits.masked_fill(~chosen, float("-inf"))
    batch, heads = query.shape[:2]
    rows = max(1, min(q_len, TRAINING_CHUNK_SCORES // max(1, batch * heads * kv_len)))
    outs = []
    for r0 in range(0, q_len, rows):
        outs.append(checkpoint(_grouped_rows, query[:, :, r0:r0 + rows], key, value, gates[:, :, r0:r0 + rows],
                               kv_len - q_len + r0, block, local, scale, softcap, use_reentrant=False))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    reads_local = (row_block - (row_block - local + 1).clamp(min=0) + 1).float()
    state.record(density=((chosen.sum(-1).float() + reads_local) / (row_block + 1)).mean())
    return out.to(query.dtype)


def _grouped_rows(query, key, value, gates, first_pos: int, block: int, local: int, scale: float,
                  softcap: float | None) -> torch.Tensor:
    """fp32 ``[B, Hq, rows, D]`` for query rows at key positions ``first_pos ..`` with gates ``[B, Hq, rows, NC]``.

    Only the key blocks up to the last row's are read.  Each block is exponentiated against its own maximum ``m_n``
    (``E = exp(s - m_n)``, block sums ``S_n >= 1`` for a block with a visible key), so a key's weight is ``E_j``
    times a per-(row, block) factor: ``exp(m_n - lse)`` in a local block, ``exp(g_n - lse) / S_n`` in a gated one."""
    batch, heads, rows, dim = query.shape
    kv_heads, group = key.shape[1], heads // key.shape[1]
    last = first_pos + rows  # keys past the last row's position are never read
    n_k = math.ceil(last / block)
    kv_end = min(key.shape[2], n_k * block)
    q = (query.float() * scale).view(batch, kv_heads, group, rows, dim)
    scores = torch.einsum("bhgtd,bhsd->bhgts", q, key[:, :, :kv_end].float()).reshape(batch, heads, rows, kv_end)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    row_pos = first_pos + torch.arange(rows, device=query.device)
    visible = torch.arange(kv_end, device=query.device)[None] <= row_pos[:, None]  # causal
    scores = scores.masked_fill(~visible, float("-inf"))
    if kv_end < n_k * block:  # the incomplete last block (local): -inf keys to fill the block view
        scores = F.pad(scores, (0, n_k * block - kv_end), value=float("-inf"))
    scores = scores.view(batch, heads, rows, n_k, block)
    peak = scores.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak)).detach()  # fully hidden block: 0
    exps = torch.exp(scores - peak)
    sums = exps.sum(-1)  # [B, Hq, rows, NK]: >= 1 for a block with a visible key, 0 otherwise
    sums = torch.where(sums > 0, sums, torch.ones_like(sums))
    peak = peak.squeeze(-1)
    blocks = torch.arange(n_k, device=query.device)[None]
    is_local = (blocks > (row_pos // block - local)[:, None]) & (blocks <= (row_pos // block)[:, None])  # [rows, NK]
    gates = gates[..., :n_k]
    if gates.shape[-1] < n_k:
        gates = F.pad(gates, (0, n_k - gates.shape[-1]), value=float("-inf"))
    local_lse = torch.where(is_local, peak + torch.log(sums), float("-inf"))
    total = torch.logsumexp(torch.cat([local_lse, gates], dim=-1), dim=-1, keepdim=True)  # finite: own key
    factor = torch.where(is_local, torch.exp(peak - total), torch.exp(gates - total) / sums)
    weights = (exps * factor[..., None]).view(batch, kv_heads, group, rows, n_k * block)[..., :kv_end]
    out = weights @ value[:, :, None, :kv_end].float()
    return out.reshape(batch, heads, rows, value.shape[-1])


@register_method(
    "landmark",
    config=LandmarkConfig,
    category="other",
    families=("llm", "lvlm"),
    needs_finetune=True,
    patterns=("causal-self",),
    paper=PAPER,
    make_state=make_landmark_state,
)
def landmark_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """Landmark attention: blocks gated by learned landmark keys (grouped softmax), top-k blocks at inference."""
    state = module.patchattn
    config = state.config
    q_len, kv_len = query.shape[2], key.shape[2]
    reason, spans = sparse_reason(state, attention_mask, q_len, kv_len, kwargs)
    if reason is None and config.local_blocks >= math.ceil(kv_len / config.block_size):
        reason = "dense layer"  # every block is local: the model's own attention, exactly (no warning)
    if reason is not None:
        record_dense_call(state, "landmark", reason, q_len, kv_len, kwargs)
        return dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if dropout:
        raise NotImplementedError("patchattn landmark: attention dropout is not supported (the engine has none); set "
                                  "the model's attention dropout to 0")
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    top_k = 1 << 30 if module.training and config.train_all_blocks else config.top_k

    def run(q, k, v):  # unpadded rows: blocks counted from the row's first real token
        return grouped_landmark_attention(state, q, k, v, scale, kwargs.get("softcap"), top_k).transpose(1, 2)

    if spans is None:
        return run(query, key, value), None
    return run_by_rows(state, query, key, value, spans, run), None
