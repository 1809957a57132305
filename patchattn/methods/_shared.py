"""Helpers that more than one method uses, so that no method file imports another.

* block top-k selection (``blocktopk``, ``hip``): block means of keys and queries, the compressed key cache kept
  while decoding, the always-read sink and local blocks, and decode lists from the fused selection;
* per-head sink + window decode lists (``streaming``'s row, per head for ``duo`` and ``moa``);
* grouped training attention (``longlora``, ``sinklora``): the shared config fields, the group size, when the
  training attention runs, the block size (and, where the segments do not fall on kernel blocks, a padded token
  layout on which they do), and block lists cached per shape.

The block-sparse glue (padding, the dense fallbacks, the kernel call) is in ``_sparse``; head helpers in ``_heads``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import MethodConfig, option
from ..kernels.blockselect import decode_block_topk, row_block_means
from ..kernels.blocksparse import blocks_from_mask
from ..masks import BlockGeometry, RowGeometry, runs_lists, sink_and_window_rows
from ..state import MethodState
from ._sparse import SparseState, memo_decode_lists


# ---- block top-k selection (blocktopk, hip) -----------------------------------------------------------------------
@dataclass
class KeyMeans:
    """The compressed key cache: the mean key of each block (``[B, Hkv, NK, D]``, keys' dtype) of the first
    ``length`` keys."""

    length: int
    means: torch.Tensor


@dataclass
class RowMeans:
    """The compressed key cache of decode steps over rows of different lengths (``decode_rows``: a static cache, a
    padded batch): ``means`` ``[B, Hkv, NK, D]`` (keys' dtype), block ``j`` of row ``b`` being keys ``starts[b] +
    j * block`` ..., NK from the cache's capacity.  Built from the keys on the first such step of a sequence (in
    place when a buffer of that shape is left from an earlier one), then each step refreshes each row's newest block
    in place (``decode_block_topk``'s ``keys=``): a compiled step keeps no graph output across steps, so the step
    replays in a CUDA graph.  ``built``: a host flag (torch.compile guards on it, so the steady-state step compiles
    once); any call on the host path clears it, so a sequence that grew there is rebuilt."""

    means: torch.Tensor | None = None
    built: bool = False


@dataclass
class KeyMeansState(SparseState):
    """State of the methods that score key blocks by their mean key (``blocktopk``, ``hip``).  ``row_means`` is not a
    cache field: it is one object shared with the row groups' copies, so their host calls mark it stale too."""

    CACHE_FIELDS: ClassVar[tuple[str, ...]] = (*SparseState.CACHE_FIELDS, "key_means")
    DECODE_BUFFERS: ClassVar[bool] = True

    key_means: KeyMeans | None = None
    row_means: RowMeans = dataclasses.field(default_factory=RowMeans)


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, H, ceil(T / block), D]`` mean over each block's real (unpadded) rows."""
    b, h, t, d = x.shape
    n = -(-t // block)
    if n == 1:  # one (possibly partial) block, e.g. the newest block while decoding: a single reduction
        return x.mean(dim=2, keepdim=True, dtype=torch.float32)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block - t))
    sums = padded.view(b, h, n, block, d).sum(dim=3)
    # Rows per block (the last one may be short), built on the device: no host-to-device copy under graph capture.
    counts = (t - torch.arange(n, device=x.device) * block).clamp(max=block).float()
    return sums / counts[:, None]


def _cache_fits(cached: KeyMeans | None, key: torch.Tensor) -> bool:
    """Whether a cached compressed key cache belongs to keys of this batch, head count and dtype."""
    return cached is not None and cached.means.shape[:2] == key.shape[:2] and cached.means.dtype == key.dtype


def key_block_means(state, key: torch.Tensor, block: int, q_len: int) -> torch.Tensor:
    """``[B, Hkv, NK, D]`` mean key per block, kept in the patch state as a compressed key cache.

    A prefill computes it from scratch; a decode step (a few new queries, the cache only grew) recomputes only the
    blocks that changed, so selecting blocks never re-reads the whole KV cache (Kinetics' page means).  Means are
    summed in fp32 and stored in the keys' dtype: a decode step's scoring reads the whole compressed cache, and
    fp32 means were more bytes than the K/V blocks the attention then reads (batch 8, bench/decode/RESULTS.md).
    """
    cached = state.method_state.key_means
    t = key.shape[2]
    if q_len > 16 or not _cache_fits(cached, key) or cached.length > t:
        means = block_means(key, block).to(key.dtype)
    elif cached.length == t:
        means = cached.means
    else:
        first = cached.length // block  # the first block that gained keys since the last call
        tail = block_means(key[:, :, first * block :], block).to(key.dtype)
        means = cached.means
        if means.shape[2] == first + tail.shape[2]:
            means[:, :, first:] = tail  # same blocks, the last one grew: update in place
        else:
            means = torch.cat([means[:, :, :first], tail], dim=2)
    state.method_state.key_means = KeyMeans(t, means)
    return means


def forced_blocks(g: BlockGeometry, sink_blocks: int, local_blocks: int, device=None) -> torch.Tensor:
    """``[NQ, NK]`` sink and local blocks, read whatever their score."""
    distance = g.diagonal_block(device)[:, None] - g.key_blocks(device)
    return (g.key_blocks(device) < sink_blocks) | ((distance >= 0) & (distance < local_blocks))


def decode_means(state, key: torch.Tensor, block: int) -> tuple[torch.Tensor, bool]:
    """Decoding: the compressed key cache, and whether only its newest block changed since the last call.

    In that case (every decode step) the newest block's mean is left to the selection kernel, which recomputes it
    from the keys as it scores (no launch of its own; a fresh block gets a row here first); otherwise the changed
    blocks are recomputed by :func:`key_block_means`.
    """
    cached = state.method_state.key_means
    t = key.shape[2]
    n = -(-t // block)
    if not _cache_fits(cached, key) or not (n - 1) * block <= cached.length <= t:
        return key_block_means(state, key, block, 1), False
    means = cached.means
    if means.shape[2] == n - 1:  # the cache just started a block: give it a row (filled by the kernel)
        means = torch.cat([means, means.new_empty(*means.shape[:2], 1, means.shape[3])], dim=2)
    elif means.shape[2] != n:
        return key_block_means(state, key, block, 1), False
    state.method_state.key_means = KeyMeans(t, means)
    return means, True


def decode_lists(query, key, state, mass: float = 1.0):
    """Decoding (one query row, so 'max' and 'mean' scores agree): block lists straight from the fused selection,
    by the config's ``top_k``, ``sink_blocks``, ``local_blocks``, ``per_head``, ``score`` and ``backend``; the
    compressed key cache is brought up to date on the way."""
    config = state.config
    k_means, tail = decode_means(state, key, config.block_size)
    return decode_block_topk(query[:, :, 0], k_means, top_k=config.top_k, sink_blocks=config.sink_blocks,
                             local_blocks=config.local_blocks, mass=mass, per_head=config.per_head,
                             reduce=config.score, keys=key if tail else None, block=config.block_size,
                             backend=config.backend)


def mark_row_means_stale(state) -> None:
    """A call on the host path (a prefill, a decode step without a mask): the keys may have changed in ways the row
    decode's in-place updates do not follow, so its next step rebuilds the compressed key cache."""
    state.method_state.row_means.built = False


def row_key_means(state, key: torch.Tensor, rows: RowGeometry) -> tuple[torch.Tensor, bool]:
    """The row decode's compressed key cache (``RowMeans``) for this step, and whether it was built here (every
    block computed from ``key``) rather than carried from the last step (its rows' newest blocks then still to be
    refreshed, which ``decode_block_topk`` does with ``keys=``).  Static shapes, no host read."""
    kept = state.method_state.row_means
    b, h, _, d = key.shape
    shape = (b, h, rows.n_k, d)
    means = kept.means
    if means is not None and (means.dtype, means.device) != (key.dtype, key.device):
        means = kept.means = None  # the model moved or changed dtype: a new buffer
    if kept.built and means is not None and means.shape[:2] == key.shape[:2]:
        if means.shape == shape:
            return means, False
        if means.shape[2] < rows.n_k:  # a growing (default) cache started a block: row-relative blocks stay put
            kept.means = torch.cat([means, means.new_zeros(b, h, rows.n_k - means.shape[2], d)], dim=2)
            return kept.means, False
    starts = rows.starts if rows.starts is not None else torch.zeros_like(rows.lengths)
    fresh = row_block_means(key, starts, rows.lengths, rows.block_k, rows.n_k).to(key.dtype)
    if means is not None and means.shape == shape:
        means.copy_(fresh)  # the last sequence's buffer: no new allocation
    else:
        kept.means = means = fresh
    kept.built = True
    return means, True


def decode_rows_lists(rows: RowGeometry, query, key, state, mass: float = 1.0):
    """``decode_lists`` for a decode step over rows of different lengths (``RowGeometry``, with ``starts``): each row
    selects among its own blocks, counted from its first real key, as it would alone.  No host read."""
    config = state.config
    means, built = row_key_means(state, key, rows)
    starts = rows.starts if rows.starts is not None else torch.zeros_like(rows.lengths)
    return decode_block_topk(query[:, :, 0], means, top_k=config.top_k, sink_blocks=config.sink_blocks,
                             local_blocks=config.local_blocks, mass=mass, per_head=config.per_head,
                             reduce=config.score, keys=None if built else key, block=rows.block_k,
                             lengths=rows.lengths, starts=starts, backend=config.backend)


# ---- sink + window rows (streaming, duo, moa) ---------------------------------------------------------------------
def per_head_window_lists(g: BlockGeometry, sink_tokens: int, windows: list[int], width: int, device=None):
    """One query block (decoding), a sink + window row per head (``windows[h]`` tokens; a window as long as the
    cache is a full row): ``([1, H, 1, width], [1, H, 1])``, equal to the mask path's lists, kept per the heads'
    runs; each distinct row is built once."""
    rows = sink_and_window_rows(g, sink_tokens, windows)

    def build():
        distinct = {row: runs_lists(row, width, device) for row in dict.fromkeys(rows)}
        return (torch.cat([distinct[row][0] for row in rows], dim=1),
                torch.cat([distinct[row][1] for row in rows], dim=1))

    return memo_decode_lists(("windows", rows, width), device, build)


# ---- grouped training attention (longlora, sinklora) --------------------------------------------------------------
@dataclass(kw_only=True)
class GroupedConfig(MethodConfig):
    """Fields shared by ``longlora`` and ``sinklora``: blocks, the group size and when the training attention runs."""

    block_size: int = option(64, "largest query/key block size in tokens (lowered to divide the groups; where no "
                             "kernel block does, the tokens are padded onto whole blocks)",
                             choices=(16, 32, 64, 128, 256))
    dense_layers: list = option([], "layer indices that stay dense", min=0, index="layer")  # noqa: RUF009
    group_size_ratio: float = option(0.25, "group size as a fraction of the sequence length (paper: 1/4)",
                                     min=0.0, max=1.0)
    group_size: int | None = option(None, "group size in tokens (overrides group_size_ratio)", min=2)
    train_only: bool = option(True, "run the sparse training attention only when the module is in training mode "
                              "(paper: full attention at inference)")

    def validate(self) -> None:
        if self.group_size is None and self.group_size_ratio <= 0:
            raise ValueError(f"{self.where('group_size_ratio')} must be > 0 (or set group_size), "
                             f"got {self.group_size_ratio}")


def group_size_for(config: GroupedConfig, seq_len: int) -> int:
    """Group size in tokens for a sequence of ``seq_len`` tokens (``int(N * ratio)``, as the paper's code).

    A sequence of one token is one group (the rows of a padded batch can be that short)."""
    group = config.group_size if config.group_size is not None else int(seq_len * config.group_size_ratio)
    if seq_len == 1 and config.group_size is None:
        return 1
    if group < 2:
        raise ValueError(f"{config.method}: group size {group} (sequence {seq_len} x group_size_ratio "
                         f"{config.group_size_ratio}) must be >= 2; use longer sequences or set group_size")
    return min(group, seq_len) if config.group_size is None else group


def training_attention_active(module, config: GroupedConfig, q_len: int, kv_len: int) -> bool:
    """Whether this call runs the training attention: training mode (or ``train_only=False``) and no KV cache."""
    if config.train_only and not module.training:
        return False
    return q_len == kv_len


@dataclass
class GroupedState(MethodState):
    """State of the grouped training attentions (``longlora``, ``sinklora``): the latest shape's block lists."""

    lists_key: tuple | None = None
    lists: tuple | None = None


def cached_group_lists(state, key, build):
    """Block lists cached per shape (one entry: training shapes repeat every step)."""
    kept = state.method_state
    if kept.lists is not None and kept.lists_key == key:
        return kept.lists
    kept.lists_key, kept.lists = key, blocks_from_mask(build())
    return kept.lists


# ---- segments on kernel blocks (longlora, sinklora) ---------------------------------------------------------------
# Block sizes the Triton kernel takes (the torch reference takes any).
KERNEL_BLOCKS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class PieceLayout:
    """Tokens spread so that every piece of ``unit`` tokens (the segments' common boundaries) starts on a block.

    Token ``x`` sits at ``(x // unit) * piece + x % unit``, ``piece`` being ``unit`` rounded up to whole blocks; the
    gaps are padding keys that get a ``-inf`` column bias, so a query reads exactly the real keys its block list and
    the causal rule allow (real tokens keep their order).  Padding query rows are computed and dropped.
    """

    seq_len: int
    unit: int
    block: int

    @property
    def piece(self) -> int:
        return -(-self.unit // self.block) * self.block

    @property
    def length(self) -> int:
        full, rest = divmod(self.seq_len, self.unit)
        return full * self.piece + -(-rest // self.block) * self.block

    def position(self, tokens):
        """Padded position of token indices (ints or a tensor)."""
        return tokens // self.unit * self.piece + tokens % self.unit

    def block_tokens(self, device=None) -> torch.Tensor:
        """``[NQ]`` the real token at the start of each padded block (a piece never starts with padding)."""
        starts = torch.arange(0, self.length, self.block, device=device)
        return starts // self.piece * self.unit + starts % self.piece

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, T, D]`` -> ``[B, H, length, D]`` with zeros in the gaps (differentiable)."""
        index = self.position(torch.arange(self.seq_len, device=x.device))
        return x.new_zeros(*x.shape[:2], self.length, x.shape[3]).index_copy(2, index, x)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, length, D]`` -> ``[B, H, T, D]``: the real rows."""
        return x.index_select(2, self.position(torch.arange(self.seq_len, device=x.device)))

    def key_bias(self, device=None) -> torch.Tensor:
        """float32 ``[length]``: 0 on real keys, ``-inf`` on padding."""
        bias = torch.full((self.length,), float("-inf"), device=device)
        bias[self.position(torch.arange(self.seq_len, device=device))] = 0.0
        return bias


def grouped_blocks(seq_len: int, unit: int, block_size: int) -> tuple[int, PieceLayout | None]:
    """(block size, padded layout or None) for segments whose boundaries are the multiples of ``unit`` tokens.

    The largest block dividing ``unit`` (and ``block_size``) puts every boundary on a block: exact block lists on the
    tokens as they are, when the kernel takes that block.  Otherwise (``gcd(70, 64) = 2``) the tokens are spread on a
    ``PieceLayout`` whose block is the largest kernel block within 1/16 of the least padding."""
    block = math.gcd(unit, block_size)
    if block in KERNEL_BLOCKS:
        return block, None
    sizes = [b for b in KERNEL_BLOCKS if b <= block_size]
    padded = {b: -(-unit // b) * b for b in sizes}
    least = min(padded.values())
    block = max(b for b in sizes if padded[b] <= least + least // 16)
    return block, PieceLayout(seq_len, unit, block)
