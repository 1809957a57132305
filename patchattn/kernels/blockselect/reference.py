"""Pure torch: the CPU path of every :mod:`patchattn.kernels.blockselect` entry point and the oracle of its kernels.

* Decode: one query row per (batch, head) scores every key block by ``q . mean_key(block)``, keeps the sink and local
  blocks, then the best-scoring other blocks until their estimated share of the softmax mass reaches ``mass`` (at
  most ``top_k``), and returns the choice as ascending block lists.
* Prefill: each query block's best row against every key-block mean (``blocktopk``'s scores), the same choice per
  query block from those scores, and HiP's hierarchical top-k (``hip``'s search).
"""
from __future__ import annotations

import torch

from ..blocksparse import blocks_from_mask


def within_mass(logits, allowed, forced, top_logits, mass: float) -> torch.Tensor:
    """For top blocks sorted best first, whether each is still needed to reach ``mass`` of the estimated softmax mass.

    ``logits`` ``[..., NK]`` are the blocks' scaled scores (a block's estimated mass is their softmax over the
    ``allowed`` blocks); the ``forced`` blocks count first, so rows the sink and local blocks already explain read
    few extra blocks and diffuse rows read up to the cap.
    """
    total = torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), dim=-1, keepdim=True)
    forced_mass = torch.exp(logits - total).masked_fill(~forced, 0.0).sum(dim=-1, keepdim=True)
    top_mass = torch.exp(top_logits - total)
    before = forced_mass + top_mass.cumsum(dim=-1) - top_mass
    return before < mass


def forced_decode_blocks(n_k: int, sink_blocks: int, local_blocks: int, device=None,
                         n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """``[NK]`` sink blocks and the ``local_blocks`` last blocks (the query sits in the last one); with ``n_valid``
    (``[B]`` valid blocks of each row), ``[B, 1, NK]`` counted within each row's valid blocks."""
    cols = torch.arange(n_k, device=device)
    if n_valid is None:
        return (cols < sink_blocks) | (cols > n_k - 1 - local_blocks)
    last = n_valid.reshape(-1, 1, 1) - 1
    return valid_decode_blocks(n_k, n_valid) & ((cols < sink_blocks) | (cols > last - local_blocks))


def valid_decode_blocks(n_k: int, n_valid: torch.Tensor) -> torch.Tensor:
    """``[B, 1, NK]`` the blocks each row holds (its first ``n_valid`` of the ``NK`` columns)."""
    return torch.arange(n_k, device=n_valid.device) < n_valid.reshape(-1, 1, 1)


def row_block_counts(lengths: torch.Tensor, block: int) -> torch.Tensor:
    """``[B]`` blocks holding each row's ``lengths`` keys (0 for an empty row)."""
    return torch.div(lengths + block - 1, block, rounding_mode="floor")


def update_row_tail_means(k_means: torch.Tensor, keys: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor,
                          block: int) -> None:
    """Recompute in place each row's newest block mean: block ``j`` of row ``b`` holds the keys
    ``starts[b] + j * block`` ... (up to ``starts[b] + lengths[b]``) of ``keys`` ``[B, Hkv, T, D]``; ``k_means``
    ``[B, Hkv, NK, D]``.  Static shapes, no host read (a gather of ``block`` keys per row, a scatter); an empty row
    writes a zero mean into its block 0, which it does not read."""
    b, h, _, d = k_means.shape
    newest = (row_block_counts(lengths, block) - 1).clamp(min=0).long()  # [B]
    first = starts.long() + newest * block
    positions = first[:, None] + torch.arange(block, device=keys.device)  # [B, block]
    real = positions < (starts.long() + lengths.long())[:, None]
    positions = positions.clamp(max=keys.shape[2] - 1)
    rows = keys.gather(2, positions[:, None, :, None].expand(b, h, block, d))
    sums = torch.where(real[:, None, :, None], rows, 0).sum(dim=2, dtype=torch.float32)
    mean = sums / real.sum(-1).clamp(min=1).reshape(-1, 1, 1)
    k_means.scatter_(2, newest.reshape(-1, 1, 1, 1).expand(b, h, 1, d), mean[:, :, None].to(k_means.dtype))


def row_block_means(keys: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, block: int,
                    n_k: int) -> torch.Tensor:
    """``[B, Hkv, n_k, D]`` fp32 mean of every block of each row, blocks counted from the row's first key
    ``starts[b]`` (``lengths[b]`` keys; blocks past a row's keys are zero).  Static shapes, no host read."""
    b, h, t, d = keys.shape
    offsets = torch.arange(n_k * block, device=keys.device)
    positions = (starts.long()[:, None] + offsets).clamp(max=t - 1)
    real = offsets < lengths.long()[:, None]  # [B, n_k * block]
    rows = keys.gather(2, positions[:, None, :, None].expand(b, h, n_k * block, d))
    sums = torch.where(real[:, None, :, None], rows, 0).view(b, h, n_k, block, d).sum(dim=3, dtype=torch.float32)
    counts = real.view(b, n_k, block).sum(-1).clamp(min=1)
    return sums / counts[:, None, :, None]


def group_scores(q: torch.Tensor, k_means: torch.Tensor, per_head: bool, reduce: str) -> torch.Tensor:
    """``[B, H, NK]`` fp32 scores ``q . mean_key``; H = Hq with ``per_head``, else Hkv (``reduce``: the GQA group's
    ``max`` or ``mean`` score)."""
    b, hq, d = q.shape
    hkv = k_means.shape[1]
    scores = q.float().view(b, hkv, hq // hkv, 1, d) @ k_means.float()[:, :, None].transpose(-1, -2)
    scores = scores[..., 0, :]  # [B, Hkv, G, NK]
    if per_head:
        return scores.flatten(1, 2)
    return scores.amax(dim=2) if reduce == "max" else scores.mean(dim=2)


def decode_block_topk_torch(q, k_means, *, top_k: int, sink_blocks: int, local_blocks: int, mass: float,
                            per_head: bool, reduce: str, width: int, n_valid: torch.Tensor | None = None):
    """``decode_block_topk``'s torch path; ``n_valid`` (``[B]``): each row's valid blocks (the first of the
    ``NK``; the query sits in the last valid one), None: all ``NK``."""
    n_k = k_means.shape[2]
    scores = group_scores(q, k_means, per_head, reduce)
    forced = forced_decode_blocks(n_k, sink_blocks, local_blocks, q.device, n_valid).expand_as(scores)
    allowed = torch.ones_like(forced) if n_valid is None else valid_decode_blocks(n_k, n_valid).expand_as(scores)
    chosen = torch.zeros_like(forced)
    k = min(top_k, n_k)
    if k > 0:
        top = scores.masked_fill(forced | ~allowed, float("-inf")).topk(k, dim=-1)
        keep = torch.isfinite(top.values)
        if mass < 1.0:
            root_d = q.shape[-1] ** 0.5
            keep &= within_mass(scores / root_d, allowed, forced, top.values / root_d, mass)
        chosen.scatter_(-1, top.indices, keep)
    idx, counts = blocks_from_mask((chosen | forced)[:, :, None], width=width)
    return idx, counts


# ---------------------------------------------------------------------------------------------
# HiP's hierarchical top-k (prefill): the torch path and the oracle of triton_tree.py
# ---------------------------------------------------------------------------------------------
def initial_segments(diagonal: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[NQ, k]`` start/end (exclusive) of ``k`` near-equal segments of blocks ``[0, diagonal]``: segment ``c`` is
    ``[floor(c * n / k), floor((c + 1) * n / k))`` for ``n = diagonal + 1`` visible blocks (integer arithmetic, so
    the Triton search cuts the same segments)."""
    cuts = torch.arange(k + 1, device=diagonal.device)[None] * (diagonal.long() + 1)[:, None] // k
    return cuts[:, :-1], cuts[:, 1:]


def search_rounds(n_k: int, k: int) -> int:
    """Halvings until the longest initial segment (``ceil(n_k / k)`` blocks) is one block: known on the host, so the
    search needs no device-to-host sync."""
    longest, rounds = -(-n_k // k), 0
    while longest > 1:
        longest, rounds = -(-longest // 2), rounds + 1
    return rounds


def tree_search_torch(q_rows: torch.Tensor, k_means: torch.Tensor, diagonal: torch.Tensor, k: int,
                      score_dtype: torch.dtype | None = None) -> torch.Tensor:
    """HiP's hierarchical top-k over key blocks: start from ``k`` equal segments of each query block's causal past,
    split every segment in two, score each half by its mean key against the query block's best row, keep the ``k``
    best halves (ties: torch's top-k order; left halves listed before right ones), repeat until single blocks.

    Args:
        q_rows: ``[B, H, NQ, R, D]`` the query rows each segment is scored against (best row wins; ``R = 1``: one
            pooled row).
        k_means: ``[B, H, NK, D]`` mean key per key block.
        diagonal: ``[NQ]`` last key block each query block may read.
        k: blocks to keep.
        score_dtype: a 16-bit dtype rounds the segment means to it before the (fp32) products, as the Triton search
            does for queries of that dtype (``q_rows`` then hold values of that dtype).

    Returns:
        bool ``[B, H, NQ, NK]`` with at most ``k`` blocks per row (every visible block when there are at most ``k``).
    """
    b, h, n_q = q_rows.shape[:3]
    n_k = k_means.shape[2]
    start, end = initial_segments(diagonal, k)
    start = start.expand(b, h, n_q, k).clone()
    end = end.expand(b, h, n_q, k).clone()
    # Prefix sums of the block means give any segment's mean key in O(1): its representative.
    prefix = torch.nn.functional.pad(k_means.cumsum(dim=2, dtype=torch.float32), (0, 0, 1, 0))
    for _ in range(search_rounds(n_k, k)):
        mid = torch.where(end - start > 1, (start + end) // 2, end)
        start = torch.cat([start, mid], dim=-1)  # left halves then right halves
        end = torch.cat([mid, end], dim=-1)
        scores = segment_scores(q_rows, prefix, start, end, score_dtype)
        best = scores.topk(k, dim=-1).indices
        start, end = torch.gather(start, -1, best), torch.gather(end, -1, best)
    return segments_to_mask(start, end, n_k)


def segments_to_mask(start: torch.Tensor, end: torch.Tensor, n_k: int) -> torch.Tensor:
    """bool ``[..., NK]``: the first block of every non-empty segment.  Empty segments write to a spare column (were
    they clamped onto a real block, a scatter of ``False`` could overwrite a chosen block's ``True``)."""
    index = torch.where(end > start, start, n_k).clamp(0, n_k)
    chosen = torch.zeros(*start.shape[:-1], n_k + 1, dtype=torch.bool, device=start.device)
    chosen.scatter_(-1, index, True)
    return chosen[..., :n_k]


def segment_scores(q_rows, prefix, start, end, score_dtype=None) -> torch.Tensor:
    """``[B, H, NQ, S]`` score of each segment: best query row . the segment's mean key (-inf if empty)."""
    b, h, n_q, n_seg = start.shape
    d = prefix.shape[-1]

    def gather(index):
        return torch.gather(prefix, 2, index.reshape(b, h, -1, 1).expand(-1, -1, -1, d)).view(b, h, n_q, n_seg, d)

    length = (end - start).clamp(min=1)[..., None]
    means = (gather(end) - gather(start)) / length
    if score_dtype is not None and score_dtype != torch.float32:
        means = means.to(score_dtype).float()
    scores = (q_rows.to(means.dtype) @ means.transpose(-1, -2)).amax(dim=3)  # [B, H, NQ, R, S] -> best row
    return scores.masked_fill(end <= start, float("-inf"))


# ---------------------------------------------------------------------------------------------
# Prefill: block scores and blocktopk's choice (the torch paths of triton_prefill.py)
# ---------------------------------------------------------------------------------------------
# Query rows x key blocks scored at once: bounds the [rows, NK] products at long lengths.
MAX_SCORE_ELEMENTS = 1 << 26


def diagonal_blocks(q_len: int, kv_len: int, block_q: int, block_k: int, device=None) -> torch.Tensor:
    """``[NQ]`` the key block holding each query block's last position (queries at the end of the keys)."""
    n_q = -(-q_len // block_q)
    last = torch.clamp((torch.arange(n_q, device=device) + 1) * block_q, max=q_len) - 1 + (kv_len - q_len)
    return torch.div(last, block_k, rounding_mode="floor")


def prefill_block_scores_torch(query, k_means, *, block_q: int, block_k: int, kv_len: int,
                               per_head: bool) -> torch.Tensor:
    """``[B, H, NQ, NK]`` fp32: each query block's best row (and its GQA group's unless ``per_head``) . each key-block
    mean, ``-inf`` after the query block's diagonal block; a chunk of query blocks at a time so the ``[rows, NK]``
    products stay small.  Products in the queries' dtype on a GPU (tensor cores, fp32 sums), fp32 on the CPU."""
    b, hq, t, d = query.shape
    hkv, n_k = k_means.shape[1], k_means.shape[2]
    groups = hq // hkv
    n_q = -(-t // block_q)
    dtype = query.dtype if query.is_cuda else torch.float32
    k_t = k_means.to(dtype).transpose(-1, -2)
    # Pad the last block by repeating its last row: the max over rows is unchanged, no masking pass needed.
    padded = query.to(dtype)
    if n_q * block_q > t:
        padded = torch.cat([padded, padded[:, :, -1:].expand(-1, -1, n_q * block_q - t, -1)], dim=2)
    padded = padded.reshape(b, hkv, groups, n_q, block_q, d)
    chunk = max(1, MAX_SCORE_ELEMENTS // max(1, b * hq * block_q * n_k))
    out = []
    for m0 in range(0, n_q, chunk):
        part = padded[:, :, :, m0 : m0 + chunk]
        rows = (part.reshape(b, hkv, -1, d) @ k_t).view(*part.shape[:-1], -1)  # [b, hkv, g, m, r, NK]
        best = rows.amax(dim=4)
        out.append(best if per_head else best.amax(dim=2, keepdim=True))
    scores = torch.cat(out, dim=3).flatten(1, 2).float()  # [B, H, NQ, NK]
    after = torch.arange(n_k, device=query.device) > diagonal_blocks(t, kv_len, block_q, block_k, query.device)[:, None]
    return scores.masked_fill(after, float("-inf"))


def _allowed_and_forced(n_q: int, n_k: int, diagonal: torch.Tensor, sink_blocks: int, local_blocks: int):
    """``[NQ, NK]`` the causally visible blocks, and among them the sink and local blocks (read whatever their
    score)."""
    cols = torch.arange(n_k, device=diagonal.device)[None, :]
    distance = diagonal[:, None] - cols
    allowed = distance >= 0
    forced = ((cols < sink_blocks) | ((distance >= 0) & (distance < local_blocks))) & allowed
    return allowed, forced


def prefill_block_choice(scores: torch.Tensor, *, q_len: int, block_q: int, block_k: int, kv_len: int, top_k: int,
                         sink_blocks: int, local_blocks: int, mass: float, head_dim: int) -> torch.Tensor:
    """bool ``[B, H, NQ, NK]``: ``blocktopk``'s choice per query block from its ``[B, H, NQ, NK]`` scores (entries
    after the diagonal are ignored): the sink and local blocks, then the ``top_k`` best others (torch's top-k order)
    or, with ``mass`` < 1, the best while the estimated softmax mass of ``score / sqrt(head_dim)`` over the visible
    blocks is below ``mass``."""
    n_q, n_k = scores.shape[-2:]
    diagonal = diagonal_blocks(q_len, kv_len, block_q, block_k, scores.device)
    allowed, forced = _allowed_and_forced(n_q, n_k, diagonal, sink_blocks, local_blocks)
    candidates = scores.masked_fill(~allowed | forced, float("-inf"))
    k = min(top_k, n_k)
    chosen = torch.zeros_like(candidates, dtype=torch.bool)
    if k > 0:
        top = candidates.topk(k, dim=-1)
        keep = torch.isfinite(top.values)
        if mass < 1.0:
            root_d = head_dim**0.5
            keep &= within_mass(scores.float() / root_d, allowed, forced, top.values.float() / root_d, mass)
        chosen.scatter_(-1, top.indices, keep)
    return chosen | forced


def prefill_block_select_torch(scores: torch.Tensor, *, q_len: int, block_q: int, block_k: int, kv_len: int,
                               top_k: int, sink_blocks: int, local_blocks: int, mass: float, head_dim: int,
                               last_block_dense: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prefill_block_choice` as block lists (the last query block reading every visible block with
    ``last_block_dense``), as wide as the Triton choice writes them: every block with a dense last block, else the
    bound ``top_k + sink_blocks + local_blocks`` (no host sync)."""
    chosen = prefill_block_choice(scores, q_len=q_len, block_q=block_q, block_k=block_k, kv_len=kv_len, top_k=top_k,
                                  sink_blocks=sink_blocks, local_blocks=local_blocks, mass=mass, head_dim=head_dim)
    n_q, n_k = scores.shape[-2:]
    last_block_dense = last_block_dense and n_q > 1
    if last_block_dense:
        diagonal = diagonal_blocks(q_len, kv_len, block_q, block_k, scores.device)
        chosen[..., -1, :] = torch.arange(n_k, device=scores.device) <= diagonal[-1]
    width = n_k if last_block_dense else max(1, min(n_k, top_k + sink_blocks + local_blocks))
    return blocks_from_mask(chosen, width=width)


def best_query_rows(query: torch.Tensor, block_q: int, kv_heads: int, per_head: bool) -> torch.Tensor:
    """``[B, H, NQ, R, D]`` fp32: the rows of each query block (H = Hq with ``per_head``; else Hkv, the GQA group's
    rows together), the last block padded by repeating its last row (the max over rows is unchanged)."""
    b, hq, t, d = query.shape
    n_q = -(-t // block_q)
    if n_q == 1:  # decoding: the few rows as they are
        rows = query.float()[:, :, None]
    else:
        rows = torch.cat([query, query[:, :, -1:].expand(-1, -1, n_q * block_q - t, -1)], dim=2).float()
        rows = rows.view(b, hq, n_q, block_q, d)
    if per_head:
        return rows
    grouped = rows.view(b, kv_heads, hq // kv_heads, *rows.shape[2:])
    return grouped.transpose(2, 3).reshape(b, kv_heads, rows.shape[2], (hq // kv_heads) * rows.shape[3], d)


def prefill_tree_search_torch(query: torch.Tensor, k_means: torch.Tensor, *, block_q: int, block_k: int, kv_len: int,
                              k: int, per_head: bool) -> torch.Tensor:
    """:func:`tree_search_torch` scored by each query block's best row (and its GQA group's unless ``per_head``):
    bool ``[B, H, NQ, NK]``; the torch path of ``triton_tree.tree_search``."""
    hkv = k_means.shape[1]
    rows = best_query_rows(query, block_q, hkv, per_head)
    means = k_means.repeat_interleave(query.shape[1] // hkv, dim=1) if per_head else k_means
    diagonal = diagonal_blocks(query.shape[2], kv_len, block_q, block_k, query.device)
    return tree_search_torch(rows, means, diagonal, k, score_dtype=query.dtype)
