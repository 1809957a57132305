"""Padded batches under context parallelism: each row's real tokens moved to the front of an internal layout.

In one process a padded batch runs row group by row group on the real tokens only (``methods/_rows.py``): a row's
blocks, sinks and windows count from its first real token.  The ranks split one token layout shared by every row,
so the rows are first shifted (``torch.roll``) until each row's real span starts at position 0: left padding
becomes right padding, and block ``i`` of the split is block ``i`` of every row as the row sees itself alone.  The
padding then sits after each row's real tokens, where causal attention never reaches it from a real query, and the
zig-zag plan (made for the whole width) applies to every row unchanged.  Outputs go back to the caller's layout
(``to_original``); rotary positions are the caller's, moved with their tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    """Where each row's real tokens are: original positions ``[starts[r], starts[r] + lengths[r])`` of ``tokens``.

    Internal position ``i`` of row ``r`` is original position ``(i + starts[r]) % tokens``: real tokens first."""

    tokens: int
    starts: tuple[int, ...]
    lengths: tuple[int, ...]

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor | None, shape: tuple[int, int]) -> RowLayout | None:
        """The layout of a ``[B, T]`` 0/1 mask whose ones are one run per row (left, right or both-sided padding);
        None when nothing is padded.  Raises a ValueError for another mask."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(shape):
            raise ValueError(f"context_parallel: attention_mask must be [B, T] like input_ids {tuple(shape)}; got "
                             f"{tuple(attention_mask.shape)}")
        real = attention_mask.bool().cpu()
        if bool(real.all()):
            return None
        starts, lengths = [], []
        for r, row in enumerate(real):
            length = int(row.sum())
            start = int(row.int().argmax()) if length else 0
            if length == 0 or not bool(row[start:start + length].all()):
                raise ValueError(f"context_parallel: row {r} of attention_mask is not one run of ones (left or right "
                                 "padding, at least one real token)")
            starts.append(start)
            lengths.append(length)
        return cls(real.shape[1], tuple(starts), tuple(lengths))

    def groups(self) -> dict[int, list[int]]:
        """Rows by their real length (in the internal layout a row's real span is ``[0, length)``)."""
        out: dict[int, list[int]] = {}
        for row, length in enumerate(self.lengths):
            out.setdefault(length, []).append(row)
        return out

    def original_positions(self, internal: torch.Tensor) -> torch.Tensor:
        """``[B, n]``: the original positions of the internal positions ``internal`` ``[n]``, per row."""
        starts = torch.tensor(self.starts, device=internal.device)[:, None]
        return (internal[None] + starts) % self.tokens

    def to_internal(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """A whole-width per-token tensor (batch on dim 0, tokens on ``dim``) in the internal layout."""
        return torch.stack([row.roll(-start, dims=dim - 1) for row, start in zip(tensor, self.starts)])

    def to_original(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """The inverse of ``to_internal``."""
        return torch.stack([row.roll(start, dims=dim - 1) for row, start in zip(tensor, self.starts)])
