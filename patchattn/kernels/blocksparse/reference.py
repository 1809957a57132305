"""Pure-torch block-sparse attention: the test oracle and the CPU path (``backend="torch"``).

Vectorised over batch, heads and a chunk of query blocks at once: for each chunk it gathers only the
listed key blocks (``[.., K * block_k, D]``), never a ``Tq x Tk`` matrix, so memory stays
``O(chunk * K * block_k)``.  Partial tiles (``tile_mask_ids >= 0``) gather their element masks beside the keys and
AND them into the same visibility mask as the causal and padding rules.  Plain torch ops, so autograd works; under
autograd each chunk is checkpointed so training memory does not grow with the number of key blocks read.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

# Upper bound on score elements materialised per chunk (fp32): ~32 MB per live score-sized tensor.
CHUNK_SCORE_ELEMENTS = 1 << 23


def block_sparse_attention_torch(q, k, v, kv_indices, kv_counts, *, block_q, block_k, causal,
                                 scale, softcap=None, kv_start=None, kv_end=None, col_bias=None,
                                 head_gain=None, active=None, return_lse=False, lists_from_start=False,
                                 tile_masks=None, tile_mask_ids=None):
    """Same contract as :func:`patchattn.kernels.blocksparse.block_sparse_attention` (inputs validated)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    n_q_blocks, max_entries = kv_indices.shape[2], kv_indices.shape[3]
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    plain = (causal and not lists_from_start and softcap is None and kv_start is None and kv_end is None
             and col_bias is None and head_gain is None and active is None and not return_lse
             and tile_masks is None)
    if plain and not _needs_grad(q, k, v) and _lists_every_causal_block(kv_indices, kv_counts, Tq, Tk, block_q, block_k):
        # Lists that name every causally allowed block once are causal attention: on the CPU the fused SDPA
        # kernel computes it several times faster than gathering every block (same math, same compute dtype).
        return _causal_sdpa(q, k, v, scale, compute_dtype)
    # Fold the GQA group into the rows of one matmul when the whole group reads the same blocks.
    fold = kv_indices.shape[1] in (1, Hkv) and (col_bias is None or col_bias.shape[1] in (1, Hkv))
    ctx = _Context(B, Hq, Hkv, group, Tq, Tk, D, block_q, block_k, causal, scale, softcap, fold,
                   compute_dtype, kv_start, kv_end, col_bias, lists_from_start, _tiles_with_full(tile_masks))
    rows_per_block = block_q * (group if fold else 1)
    per_block = B * Hkv * (1 if fold else group) * rows_per_block * max(1, max_entries * block_k)
    chunk = max(1, min(n_q_blocks, CHUNK_SCORE_ELEMENTS // per_block))
    use_checkpoint = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, col_bias))

    outs, lses = [], []
    for m0 in range(0, n_q_blocks, chunk):
        m1 = min(n_q_blocks, m0 + chunk)
        q_rows = q[:, :, m0 * block_q: min(m1 * block_q, Tq)]
        idx, cnt = kv_indices[:, :, m0:m1], kv_counts[:, :, m0:m1]
        tid = None if tile_mask_ids is None else tile_mask_ids[:, :, m0:m1]
        if use_checkpoint:
            o, lse = checkpoint(_attend_chunk, ctx, m0, q_rows, k, v, idx, cnt, col_bias, tid,
                                use_reentrant=False)
        else:
            o, lse = _attend_chunk(ctx, m0, q_rows, k, v, idx, cnt, col_bias, tid)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs, dim=2)
    lse = torch.cat(lses, dim=2)
    if active is not None:
        keep = active.transpose(1, 2)  # [B, Hq, Tq]
        out = out * keep[..., None]
        lse = lse.masked_fill(~keep, float("-inf"))
    if head_gain is not None:
        out = out * _gain_as_bhtd(head_gain)
    out = out.to(q.dtype)
    return (out, lse.float()) if return_lse else out


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _lists_every_causal_block(kv_indices, kv_counts, Tq, Tk, block_q, block_k) -> bool:
    """True for a CPU prefill whose every list names exactly the blocks ``0..m`` (query block ``m``), in any order."""
    if kv_indices.device.type != "cpu" or Tq != Tk or block_q != block_k:
        return False
    n_q, entries = kv_indices.shape[2], kv_indices.shape[3]
    if entries < n_q:
        return False
    pos = torch.arange(n_q)
    if not bool((kv_counts == pos + 1).all()):
        return False
    listed = kv_indices[..., :n_q].long()
    listed = torch.where(pos < kv_counts[..., None], listed, n_q).sort(dim=-1).values
    expected = torch.where(pos[None, :] <= pos[:, None], pos[None, :], n_q)  # row m: 0..m, then filler
    return bool((listed == expected).all())


def _causal_sdpa(q, k, v, scale, compute_dtype):
    group = q.shape[1] // k.shape[1]
    k = k.to(compute_dtype).repeat_interleave(group, dim=1) if group > 1 else k.to(compute_dtype)
    v = v.to(compute_dtype).repeat_interleave(group, dim=1) if group > 1 else v.to(compute_dtype)
    out = torch.nn.functional.scaled_dot_product_attention(q.to(compute_dtype), k, v, is_causal=True, scale=scale)
    return out.to(q.dtype)


def _tiles_with_full(tile_masks):
    """``tile_masks [P, bq, bk]`` with an all-visible tile in front, so ``tile id + 1`` indexes it (-1: whole block)."""
    if tile_masks is None:
        return None
    full = torch.ones((1, *tile_masks.shape[1:]), dtype=torch.bool, device=tile_masks.device)
    return torch.cat([full, tile_masks.bool()])


def _gain_as_bhtd(head_gain):
    """[B, Tq, Hq] or [B|1, Hq] -> broadcastable against [B, Hq, Tq, D]."""
    if head_gain.dim() == 3:
        return head_gain.transpose(1, 2)[..., None]
    return head_gain[:, :, None, None]


class _Context:
    """Shapes and options shared by every chunk (a plain holder, so checkpoint can pass it)."""

    def __init__(self, B, Hq, Hkv, group, Tq, Tk, D, block_q, block_k, causal, scale, softcap,
                 fold, compute_dtype, kv_start, kv_end, col_bias, lists_from_start=False, tiles=None):
        self.__dict__.update(locals())
        del self.__dict__["self"]


def _expand_lists(ctx, t):
    """[B', H', C, ...] -> [B, Hkv, G', C, ...] with G' = 1 when folded, else the group size."""
    Bp, Hp = t.shape[:2]
    rest = t.shape[2:]
    if Hp == ctx.Hq and ctx.group > 1:
        t = t.reshape(Bp, ctx.Hkv, ctx.group, *rest)
    else:
        t = t.reshape(Bp, Hp, 1, *rest)
    g = 1 if ctx.fold else ctx.group
    return t.expand(ctx.B, ctx.Hkv, g, *rest)


def _attend_chunk(ctx, m0, q_rows, k, v, idx, cnt, col_bias, tile_ids=None):
    B, Hkv, G, bq, bk = ctx.B, ctx.Hkv, ctx.group, ctx.block_q, ctx.block_k
    if idx.device.type == "cpu" and not torch.compiler.is_compiling():
        # Lists are padded to the longest row of the whole call (causal rows near the start list few blocks):
        # read only as many entries as this chunk's longest list. The dropped entries are padding, masked to
        # -inf, so only the length of the reductions changes. Not on GPUs: a host sync breaks graph capture.
        used = max(1, int(cnt.max())) if cnt.numel() else 1
        idx = idx[..., :used]
        tile_ids = None if tile_ids is None else tile_ids[..., :used]
    n_blocks, n_entries = idx.shape[2], idx.shape[3]
    # Without autograd the score-sized temporaries are updated in place (same operations, fewer allocations).
    inplace = not torch.is_grad_enabled()
    rows_here = q_rows.shape[2]
    padded = n_blocks * bq
    qc = q_rows.to(ctx.compute_dtype)
    if rows_here < padded:
        qc = torch.nn.functional.pad(qc, (0, 0, 0, padded - rows_here))
    qc = qc.reshape(B, Hkv, G, n_blocks, bq, ctx.D)
    if ctx.fold:  # rows ordered (g, i) inside each query block
        qc = qc.permute(0, 1, 3, 2, 4, 5).reshape(B, Hkv, 1, n_blocks, G * bq, ctx.D)

    # Key positions of every listed block: [B, Hkv, G', C, K * bk].
    idx_e = _expand_lists(ctx, idx).long()
    entry_ok = torch.arange(n_entries, device=idx.device) < _expand_lists(ctx, cnt)[..., None]
    offs = torch.arange(bk, device=idx.device)
    key_pos = (idx_e[..., None] * bk + offs).flatten(-2)
    if ctx.lists_from_start:  # each row's blocks count from its first real key
        key_pos = key_pos + ctx.kv_start.view(-1, 1, 1, 1, 1).long()
    key_ok = entry_ok[..., None].expand(*entry_ok.shape, bk).flatten(-2)
    key_ok = key_ok & (key_pos >= 0) & (key_pos < ctx.Tk)
    gather_pos = key_pos.clamp(0, ctx.Tk - 1)

    b_ix = torch.arange(B, device=k.device).view(B, 1, 1, 1, 1)
    h_ix = torch.arange(Hkv, device=k.device).view(1, Hkv, 1, 1, 1)
    k_sel = k[b_ix, h_ix, gather_pos].to(ctx.compute_dtype)  # [B, Hkv, G', C, L, D]
    v_sel = v[b_ix, h_ix, gather_pos].to(ctx.compute_dtype)

    scores = torch.matmul(qc, k_sel.transpose(-1, -2)).mul_(ctx.scale)  # [B, Hkv, G', C, R, L]
    if ctx.softcap is not None:
        scores = ctx.softcap * torch.tanh(scores / ctx.softcap)
    if col_bias is not None:
        scores = scores + _gather_bias(ctx, col_bias, gather_pos)[..., None, :]

    allowed = key_ok[..., None, :] & _row_mask(ctx, m0, n_blocks, key_pos, idx.device)
    if tile_ids is not None:
        allowed = allowed & _tile_mask(ctx, tile_ids, entry_ok)
    scores = scores.masked_fill_(allowed.logical_not_(), float("-inf"))

    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    p = scores.sub_(row_max).exp_() if inplace else torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    # Empty rows have p = 0: divide by 1 (not by a tiny number, whose gradient overflows).
    safe_denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.matmul(p, v_sel)
    out = out.div_(safe_denom) if inplace else out / safe_denom
    lse = (row_max + torch.log(denom)).squeeze(-1)

    # Back to [B, Hq, rows, D] / [B, Hq, rows].
    if ctx.fold:
        out = out.reshape(B, Hkv, n_blocks, G, bq, ctx.D).permute(0, 1, 3, 2, 4, 5)
        lse = lse.reshape(B, Hkv, n_blocks, G, bq).permute(0, 1, 3, 2, 4)
    out = out.reshape(B, ctx.Hq, padded, ctx.D)[:, :, :rows_here]
    lse = lse.reshape(B, ctx.Hq, padded)[:, :, :rows_here]
    return out, lse


def _tile_mask(ctx, tile_ids, entry_ok):
    """Each listed entry's element mask laid out like the scores: [B, Hkv, G', C, R, K * bk].

    Entries past a row's count may hold any id: they are masked by ``key_ok`` already, so read them as whole blocks.
    """
    ids = _expand_lists(ctx, tile_ids).long()
    ids = torch.where(entry_ok, ids + 1, torch.zeros_like(ids)).clamp(min=0)  # -1 -> the all-visible tile 0
    tiles = ctx.tiles[ids]  # [B, Hkv, G', C, K, bq, bk]
    tiles = tiles.transpose(-3, -2).flatten(-2)  # [B, Hkv, G', C, bq, K * bk]
    if ctx.fold:  # rows ordered (g, i): query offset i inside its block is the row modulo bq
        tiles = tiles.repeat(1, 1, 1, 1, ctx.group, 1)
    return tiles


def _gather_bias(ctx, col_bias, gather_pos):
    """col_bias [B'|1, H'', Tk] -> values at the gathered key positions, [B, Hkv, G', C, L]."""
    Bb, Hb, _ = col_bias.shape
    if Hb == ctx.Hq and ctx.group > 1:
        bias = col_bias.reshape(Bb, ctx.Hkv, ctx.group, ctx.Tk)
    else:
        bias = col_bias.reshape(Bb, Hb, 1, ctx.Tk)
    heads = max(bias.shape[2], gather_pos.shape[2])
    bias = bias.to(ctx.compute_dtype).expand(ctx.B, ctx.Hkv, heads, ctx.Tk)
    n_chunk, length = gather_pos.shape[-2:]
    pos = gather_pos.expand(ctx.B, ctx.Hkv, heads, n_chunk, length)
    return torch.gather(bias, 3, pos.reshape(*pos.shape[:3], -1)).reshape(pos.shape)


def _row_mask(ctx, m0, n_blocks, key_pos, device):
    """Causal and padding mask, [B, Hkv, G', C, R, L] broadcastable."""
    rows = torch.arange(ctx.block_q, device=device)
    q_pos = (m0 + torch.arange(n_blocks, device=device))[:, None] * ctx.block_q + rows  # [C, bq]
    if ctx.fold:
        q_pos = q_pos.repeat(1, ctx.group)  # rows ordered (g, i)
    kp = key_pos[..., None, :]  # [B, Hkv, G', C, 1, L]
    ok = torch.ones_like(kp, dtype=torch.bool)
    if ctx.causal and ctx.lists_from_start:  # the queries are the last of each row's keys
        newest = ctx.kv_end.view(-1, 1, 1, 1, 1, 1).long() - ctx.Tq
        ok = kp <= q_pos[..., None] + newest
    elif ctx.causal:
        ok = kp <= (q_pos + (ctx.Tk - ctx.Tq))[..., None]
    if ctx.kv_start is not None:
        ok = ok & (kp >= ctx.kv_start.view(-1, 1, 1, 1, 1, 1).long())
    if ctx.kv_end is not None:
        ok = ok & (kp < ctx.kv_end.view(-1, 1, 1, 1, 1, 1).long())
    return ok


def dense_attention_reference(q, k, v, allowed, *, scale, softcap=None, col_bias=None):
    """Dense masked softmax over an element mask ``allowed [B|1, Hq|1, Tq, Tk]`` (tests only: O(T^2)).

    Rows with no allowed key give 0 and lse = -inf. Computed in the inputs' dtype (pass fp64).
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if col_bias is not None:
        if col_bias.shape[1] not in (1, q.shape[1]):
            col_bias = col_bias.repeat_interleave(group, dim=1)
        s = s + col_bias[:, :, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    return torch.matmul(p, v), lse


def element_mask(kv_indices, kv_counts, Tq, Tk, *, block_q, block_k, causal, kv_start=None,
                 kv_end=None, Hq=None):
    """The element-level mask [B', Hq|H', Tq, Tk] that a block list means (tests only: O(T^2))."""
    from . import mask_from_blocks  # local import: the package imports this module

    n_k_blocks = math.ceil(Tk / block_k)
    blocks = mask_from_blocks(kv_indices, kv_counts, n_k_blocks)
    if Hq is not None and blocks.shape[1] not in (1, Hq):
        blocks = blocks.repeat_interleave(Hq // blocks.shape[1], dim=1)
    m = blocks.repeat_interleave(block_q, 2).repeat_interleave(block_k, 3)[:, :, :Tq, :Tk]
    qi = torch.arange(Tq, device=m.device)[:, None] + (Tk - Tq)
    kj = torch.arange(Tk, device=m.device)[None, :]
    if causal:
        m = m & (kj <= qi)
    if kv_start is not None:
        m = m & (kj >= kv_start.view(-1, 1, 1, 1))
    if kv_end is not None:
        m = m & (kj < kv_end.view(-1, 1, 1, 1))
    return m
