"""Token-exact masks for the block-sparse engine: whole tiles plus a few partial ones (FlexAttention's full and partial
blocks).

A :class:`TiledMask` says, for every query block, which key blocks it reads (``kv_indices`` / ``kv_counts``, as every
block-sparse method) and, per listed entry, whether the whole ``block_q x block_k`` tile is visible (id ``-1``) or only
the pairs of an element mask (id ``p``: ``tile_masks[p]``, True = visible; row = query offset inside its block, column
= key offset inside the key block).  Identical partial tiles are stored once, so a regular pattern (a neighbourhood
window sliding over a grid, a circular window, a padded grid) keeps a handful of distinct tiles however long the
sequence is.

Cost in the kernels: a whole tile runs the engine's fast path unchanged; a partial tile also loads its mask bytes and
takes the masked branch (one select per score tile), in the forward and in both backward passes.  It still pays the
full tile's two matmuls, so a tile with few visible pairs costs as much as a whole one: prefer layouts (token
permutations, block sizes aligned to the grid) that make most tiles whole, and keep partial tiles to the edges.
:meth:`TiledMask.partial_share` says how many of the tiles read are partial.

Builders: :func:`tiles_from_token_mask` (a bool ``[Tq, Tk]`` / ``[H, Tq, Tk]`` mask: tests and small masks),
:func:`tiles_from_predicate` (an element rule evaluated only on candidate tile pairs: large grids, no ``Tq x Tk``
tensor), :func:`tiles_from_parts` (whole-tile and partial-tile maps plus the partial tiles' masks).
:func:`tiled_attention` runs the engine with a TiledMask.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels import blocksparse

__all__ = ["PermutedTokens", "TiledMask", "distinct_tiles", "tiled_attention", "tiles_from_parts", "tiles_from_predicate",
           "tiles_from_token_mask"]

# Score-sized elements evaluated per chunk by tiles_from_predicate (bool/int64 temporaries stay ~100 MB at most).
PREDICATE_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True, eq=False)
class TiledMask:
    """Block lists plus per-entry element masks, ready for :func:`tiled_attention` / ``block_sparse_attention``.

    ``kv_indices`` int32 ``[1, H', NQ, K]`` ascending key blocks per query block, ``kv_counts`` int32 ``[1, H', NQ]``,
    ``tile_mask_ids`` int32 ``[1, H', NQ, K]`` (-1 whole tile, p >= 0 ``tile_masks[p]``; entries past a row's count
    are -1), ``tile_masks`` bool ``[P, block_q, block_k]`` (distinct tiles; positions past ``q_len``/``k_len`` are
    False).  ``H'`` is 1 (every head), Hkv or Hq, as the engine's lists.  Hold one per pattern and reuse it across
    layers and steps: the backward's transposed lists are remembered per live tensor.
    """

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    tile_mask_ids: torch.Tensor
    tile_masks: torch.Tensor
    block_q: int
    block_k: int
    q_len: int
    k_len: int

    def __post_init__(self):
        n_q, n_k = math.ceil(self.q_len / self.block_q), math.ceil(self.k_len / self.block_k)
        idx = self.kv_indices
        if idx.dim() != 4 or idx.shape[0] != 1 or idx.shape[2] != n_q or idx.dtype != torch.int32:
            raise ValueError(f"kv_indices: got {tuple(idx.shape)} {idx.dtype}; allowed: int32 [1, H', NQ={n_q}, K]")
        if tuple(self.kv_counts.shape) != tuple(idx.shape[:3]) or self.kv_counts.dtype != torch.int32:
            raise ValueError(f"kv_counts: got {tuple(self.kv_counts.shape)} {self.kv_counts.dtype}; allowed: int32 "
                             f"{tuple(idx.shape[:3])}")
        if self.tile_mask_ids.shape != idx.shape or self.tile_mask_ids.dtype != torch.int32:
            raise ValueError(f"tile_mask_ids: got {tuple(self.tile_mask_ids.shape)} {self.tile_mask_ids.dtype}; "
                             f"allowed: int32 {tuple(idx.shape)}")
        tm = self.tile_masks
        if tm.dim() != 3 or tuple(tm.shape[1:]) != (self.block_q, self.block_k) or tm.dtype != torch.bool:
            raise ValueError(f"tile_masks: got {tuple(tm.shape)} {tm.dtype}; allowed: bool "
                             f"[P, {self.block_q}, {self.block_k}]")
        if n_k == 0 and idx.shape[3]:
            raise ValueError("k_len is 0: no key block can be listed")

    @property
    def heads(self) -> int:
        """H': how many lists (1 = one for every head)."""
        return self.kv_indices.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return math.ceil(self.q_len / self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return math.ceil(self.k_len / self.block_k)

    def to(self, device) -> TiledMask:
        """This mask on ``device`` (a new TiledMask: move it once, not per call)."""
        return TiledMask(self.kv_indices.to(device), self.kv_counts.to(device), self.tile_mask_ids.to(device),
                         self.tile_masks.to(device), self.block_q, self.block_k, self.q_len, self.k_len)

    def _listed(self) -> torch.Tensor:
        """bool [H', NQ, K]: entries inside each row's count."""
        width = self.kv_indices.shape[-1]
        return (torch.arange(width, device=self.kv_indices.device) < self.kv_counts[..., None])[0]

    def token_mask(self) -> torch.Tensor:
        """bool ``[H', q_len, k_len]``: the visible (query, key) pairs (O(T^2): tests and small masks)."""
        bq, bk = self.block_q, self.block_k
        heads, n_q, n_k = self.heads, self.num_q_blocks, self.num_k_blocks
        dev = self.kv_indices.device
        grid = torch.zeros(heads, n_q, n_k + 1, bq, bk, dtype=torch.bool, device=dev)  # column n_k: unlisted slots
        listed = self._listed()
        blk = torch.where(listed, self.kv_indices[0].long(), n_k)
        ids = self.tile_mask_ids[0].long()
        pool = torch.cat([torch.ones(1, bq, bk, dtype=torch.bool, device=dev), self.tile_masks.to(dev)])
        tiles = pool[torch.where(listed, ids + 1, 0)]  # [H', NQ, K, bq, bk]
        h_ix = torch.arange(heads, device=dev)[:, None, None]
        m_ix = torch.arange(n_q, device=dev)[None, :, None]
        grid[h_ix, m_ix, blk] = tiles
        grid = grid[:, :, :n_k].permute(0, 1, 3, 2, 4).reshape(heads, n_q * bq, n_k * bk)
        return grid[:, : self.q_len, : self.k_len].contiguous()

    def _visible_per_entry(self) -> torch.Tensor:
        """int64 [H', NQ, K]: visible (query, key) pairs of each listed entry inside the real rows/columns."""
        bq, bk = self.block_q, self.block_k
        dev = self.kv_indices.device
        listed = self._listed()
        m = torch.arange(self.num_q_blocks, device=dev)
        rows = (self.q_len - m * bq).clamp(max=bq)[None, :, None]
        cols = (self.k_len - self.kv_indices[0].long() * bk).clamp(0, bk)
        # Per tile, a 2-D prefix count: visible pairs in its first r rows and c columns, read for edge tiles' r, c.
        table = torch.zeros(self.tile_masks.shape[0] + 1, bq + 1, bk + 1, dtype=torch.int64, device=dev)
        table[1:, 1:, 1:] = self.tile_masks.to(dev).long().cumsum(1).cumsum(2)
        ids = torch.where(listed, self.tile_mask_ids[0].long() + 1, 0)
        rows_e, cols_e = rows.expand_as(ids), cols
        partial = table[ids, rows_e, cols_e]
        whole = rows_e * cols_e
        return torch.where(listed, torch.where(ids > 0, partial, whole), 0)

    def density(self) -> float:
        """Fraction of the ``H' x q_len x k_len`` (query, key) pairs that are visible (token level; the causal rule
        of a call is not applied here).  See :meth:`tile_density` for the share of tiles the kernels read."""
        total = self.heads * self.q_len * self.k_len
        return float(self._visible_per_entry().sum()) / total if total else 0.0

    def tile_density(self) -> float:
        """Fraction of the ``H' x NQ x NK`` tiles the kernels read (whole or partial): what the work scales with."""
        total = self.heads * self.num_q_blocks * self.num_k_blocks
        return float(self.kv_counts.sum()) / total if total else 0.0

    def partial_share(self) -> float:
        """Fraction of the tiles read that are partial (each costs a mask load and the masked branch)."""
        listed, partial = self.tile_counts()
        return partial / listed if listed else 0.0

    def tile_counts(self) -> tuple[int, int]:
        """(tiles read, of which partial) over every list: what a benchmark reports beside the density."""
        listed = self._listed()
        return int(listed.sum()), int(((self.tile_mask_ids[0] >= 0) & listed).sum())


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------
class PermutedTokens:
    """What a token plan adds to its ``TiledMask``: tokens permuted into tile order.  Subclasses (dataclasses) hold
    ``tiled``, ``position`` (``[T]``: the slot of each token of the call), ``length`` (slots, padding included) and
    ``source`` (``[length]``: the token in each slot when no slot is padding, else None)."""

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, T, D]`` in the call's order -> ``[B, H, length, D]`` in slot order (padding slots zero)."""
        if self.source is not None:  # no padding slot: a plain gather, no zero fill
            return x.index_select(2, self.source)
        out = x.new_zeros(x.shape[0], x.shape[1], self.length, x.shape[3])
        return out.index_copy(2, self.position, x)

    def unpermute(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, H, length, D]`` in slot order -> ``[B, H, T, D]`` in the call's order."""
        return y.index_select(2, self.position)

    def token_mask(self) -> torch.Tensor:
        """bool ``[T, T]`` in the call's order (tests and small sequences only)."""
        mask = self.tiled.token_mask()[0]
        return mask[self.position][:, self.position]


def _as_heads(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype != torch.bool or t.dim() not in (2, 3):
        raise ValueError(f"{name}: got {tuple(t.shape)} {t.dtype}; allowed: bool [N1, N2] or [H, N1, N2]")
    return t[None] if t.dim() == 2 else t


def _check_blocks(block_q, block_k):
    for name, bs in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(bs, int) or bs <= 0:
            raise ValueError(f"{name}: got {bs!r}; allowed: a positive int (a power of two >= 16 for Triton)")


def _real_region(block_rows, block_cols, block_q, block_k, q_len, k_len):
    """bool [N, bq, bk]: which positions of the tiles at query blocks ``block_rows``, key blocks ``block_cols`` lie
    inside ``q_len x k_len``."""
    dev = block_rows.device
    r = block_rows[:, None, None] * block_q + torch.arange(block_q, device=dev)[None, :, None]
    c = block_cols[:, None, None] * block_k + torch.arange(block_k, device=dev)[None, None, :]
    return (r < q_len) & (c < k_len)


def tiles_from_parts(full: torch.Tensor, partial: torch.Tensor, partial_tiles: torch.Tensor, *, block_q: int,
                     block_k: int, q_len: int, k_len: int) -> TiledMask:
    """A TiledMask from block-level maps and the partial tiles' element masks (no ``Tq x Tk`` tensor).

    ``full``, ``partial``: bool ``[NQ, NK]`` or ``[H', NQ, NK]`` (disjoint): tiles wholly / partly visible;
    ``partial_tiles``: bool ``[n, block_q, block_k]``, one per True of ``partial`` in row-major (head, query block,
    key block) order.  Positions past ``q_len``/``k_len`` are ignored; a partial tile that is all visible (in range)
    becomes whole, one with nothing visible is dropped, and identical tiles are stored once.
    """
    _check_blocks(block_q, block_k)
    full, partial = _as_heads(full, "full"), _as_heads(partial, "partial")
    n_q, n_k = math.ceil(q_len / block_q), math.ceil(k_len / block_k)
    if full.shape != partial.shape or tuple(full.shape[1:]) != (n_q, n_k):
        raise ValueError(f"full / partial: got {tuple(full.shape)} / {tuple(partial.shape)}; allowed: the same "
                         f"[H', NQ={n_q}, NK={n_k}]")
    if bool((full & partial).any()):
        raise ValueError("full and partial overlap: a tile is either whole or partial")
    where = partial.nonzero()  # [n, 3] (head, query block, key block), row-major
    if partial_tiles.dtype != torch.bool or tuple(partial_tiles.shape) != (where.shape[0], block_q, block_k):
        raise ValueError(f"partial_tiles: got {tuple(partial_tiles.shape)} {partial_tiles.dtype}; allowed: bool "
                         f"[{where.shape[0]} (partial's True count), {block_q}, {block_k}]")
    real = _real_region(where[:, 1], where[:, 2], block_q, block_k, q_len, k_len)
    tiles = partial_tiles.to(full.device) & real
    whole = (tiles | ~real).all(dim=(1, 2))
    empty = ~tiles.any(dim=(1, 2))
    keep = ~whole & ~empty
    full = full.clone()
    full[tuple(where[whole].T)] = True
    where, tiles = where[keep], tiles[keep]
    listed = full.clone()
    listed[tuple(where.T)] = True

    ids_grid = torch.full(listed.shape, -1, dtype=torch.int32, device=listed.device)
    if tiles.shape[0]:
        pool, inverse = distinct_tiles(tiles)
        ids_grid[tuple(where.T)] = inverse.to(torch.int32)
    else:
        pool = torch.zeros(0, block_q, block_k, dtype=torch.bool, device=listed.device)
    kv_indices, kv_counts = blocksparse.blocks_from_mask(listed[None], backend="torch")
    in_count = torch.arange(kv_indices.shape[-1], device=listed.device) < kv_counts[..., None]
    ids = torch.gather(ids_grid[None], 3, kv_indices.long())
    ids = torch.where(in_count, ids, torch.full_like(ids, -1))
    return TiledMask(kv_indices, kv_counts, ids.contiguous(), pool.contiguous(), block_q, block_k, q_len, k_len)


def distinct_tiles(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[n, bq, bk]`` -> (the distinct tiles ``[P, bq, bk]``, each input's index into them ``[n]``; n = 0 gives
    empty ones).  Tiles are compared as packed 64-bit words, not byte by byte: ``torch.unique(dim=0)`` sorts rows
    with a per-row comparison, which over 4,096-byte rows took 17 ms on an H100 for one LVLM prefill's plan
    (bench/lvlm/sync_probe.txt)."""
    n = tiles.shape[0]
    if not n:
        return tiles.new_zeros(0, *tiles.shape[1:]), torch.zeros(0, dtype=torch.int64, device=tiles.device)
    bits = tiles.reshape(n, -1)
    pad = (-bits.shape[1]) % 64
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    octets = bits.to(torch.uint8).contiguous().view(torch.int64).view(n, -1, 8)  # 8 bytes of 0/1 per int64
    words = octets[..., 0]
    for shift in range(1, 8):  # bit `shift` of every byte: 64 mask bits per word
        words = words | (octets[..., shift] << shift)
    if words.shape[1] == 1:
        distinct, inverse = torch.unique(words[:, 0], return_inverse=True)
    else:
        distinct, inverse = torch.unique(words, dim=0, return_inverse=True)
    first = torch.full((distinct.shape[0],), n, dtype=torch.int64, device=tiles.device)
    first = first.scatter_reduce(0, inverse, torch.arange(n, device=tiles.device), "amin")
    return tiles[first].contiguous(), inverse


def tiles_from_token_mask(mask: torch.Tensor, block_q: int, block_k: int) -> TiledMask:
    """bool ``[Tq, Tk]`` or ``[H, Tq, Tk]`` (True = visible) -> TiledMask: empty tiles dropped, whole tiles id -1,
    identical partial tiles stored once.  Builds the ``Tq x Tk`` tiling: for tests and small masks (use
    :func:`tiles_from_predicate` for large grids).  ``token_mask()`` gives ``mask`` back (as ``[H, Tq, Tk]``)."""
    _check_blocks(block_q, block_k)
    mask = _as_heads(mask, "mask")
    heads, q_len, k_len = mask.shape
    n_q, n_k = math.ceil(q_len / block_q), math.ceil(k_len / block_k)
    padded = torch.zeros(heads, n_q * block_q, n_k * block_k, dtype=torch.bool, device=mask.device)
    padded[:, :q_len, :k_len] = mask
    tiles = padded.view(heads, n_q, block_q, n_k, block_k).permute(0, 1, 3, 2, 4)  # [H, NQ, NK, bq, bk]
    blocks = torch.stack(torch.meshgrid(torch.arange(n_q, device=mask.device), torch.arange(n_k, device=mask.device),
                                        indexing="ij"), -1).reshape(-1, 2)
    real = _real_region(blocks[:, 0], blocks[:, 1], block_q, block_k, q_len, k_len).view(1, n_q, n_k, block_q, block_k)
    full = (tiles | ~real).all(dim=(-1, -2))
    partial = (tiles & real).any(dim=(-1, -2)) & ~full
    return tiles_from_parts(full, partial, tiles[partial], block_q=block_q, block_k=block_k, q_len=q_len,
                            k_len=k_len)


def tiles_from_predicate(visible: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                         candidates: torch.Tensor, *, block_q: int, block_k: int, q_len: int,
                         k_len: int) -> TiledMask:
    """A TiledMask from an element rule, evaluated only on candidate tile pairs (no ``Tq x Tk`` tensor).

    ``candidates``: bool ``[NQ, NK]`` or ``[H', NQ, NK]``, a superset of the tiles with any visible pair (e.g. the
    blocks a window can reach); ``visible(head, q_pos, k_pos)`` gets int64 ``head [N, 1, 1]``, ``q_pos [N, bq, 1]``,
    ``k_pos [N, 1, bk]`` (token positions) and returns bool broadcastable to ``[N, bq, bk]``.  Candidates are
    evaluated in chunks (:data:`PREDICATE_CHUNK_ELEMENTS`); pairs outside the candidates are invisible.
    """
    _check_blocks(block_q, block_k)
    candidates = _as_heads(candidates, "candidates")
    where = candidates.nonzero()
    dev = candidates.device
    chunk = max(1, PREDICATE_CHUNK_ELEMENTS // (block_q * block_k))
    q_off = torch.arange(block_q, device=dev)[None, :, None]
    k_off = torch.arange(block_k, device=dev)[None, None, :]
    parts = []
    for start in range(0, where.shape[0], chunk):
        w = where[start:start + chunk]
        head, q_blk, k_blk = (w[:, i, None, None] for i in range(3))
        seen = visible(head, q_blk * block_q + q_off, k_blk * block_k + k_off)
        parts.append(seen.expand(w.shape[0], block_q, block_k).to(torch.bool))
    tiles = torch.cat(parts) if parts else torch.zeros(0, block_q, block_k, dtype=torch.bool, device=dev)
    full = torch.zeros_like(candidates)
    return tiles_from_parts(full, candidates, tiles, block_q=block_q, block_k=block_k, q_len=q_len, k_len=k_len)


# --------------------------------------------------------------------------------------------
# The engine call
# --------------------------------------------------------------------------------------------
def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiled: TiledMask, scale: float | None = None,
                    causal: bool = False, backend: str = "auto", return_lse: bool = False, options=None):
    """Attention of q ``[B, Hq, Tq, D]`` over k/v ``[B, Hkv, Tk, D]`` where exactly the pairs of ``tiled`` are
    visible (ANDed with the causal rule when ``causal``: query i at key position ``i + Tk - Tq``).  Rows with no
    visible key give 0 (lse -inf).  ``tiled.heads`` must be 1, Hkv or Hq; ``tiled`` is moved to q's device if it is
    elsewhere (move it once with :meth:`TiledMask.to` instead).  Backends and ``options`` as
    ``block_sparse_attention`` (Triton: small Tq runs the prefill kernel, not split-K decoding)."""
    if q.dim() != 4 or q.shape[2] != tiled.q_len or k.dim() != 4 or k.shape[2] != tiled.k_len:
        raise ValueError(f"q/k lengths: got Tq={q.shape[2] if q.dim() == 4 else q.shape}, "
                         f"Tk={k.shape[2] if k.dim() == 4 else k.shape}; allowed: the mask's "
                         f"q_len={tiled.q_len}, k_len={tiled.k_len}")
    if tiled.kv_indices.device != q.device:
        tiled = tiled.to(q.device)
    return blocksparse.block_sparse_attention(
        q, k, v, tiled.kv_indices, tiled.kv_counts, block_q=tiled.block_q, block_k=tiled.block_k, causal=causal,
        scale=scale, return_lse=return_lse, backend=backend, options=options, tile_masks=tiled.tile_masks,
        tile_mask_ids=tiled.tile_mask_ids)
