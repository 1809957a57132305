"""``longlora`` — LongLoRA's shifted sparse attention (S²-Attn), a training-time approximation of full attention.

Chen et al., "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models" (ICLR 2024), arXiv 2309.12307.

The sequence of ``N`` tokens is split into groups of ``G = N * group_size_ratio`` tokens (paper: 1/4) and each
token attends causally inside its group only.  Half the heads (``h >= H // 2``, as the paper's code slices them)
use groups shifted by ``G / 2`` so information flows between neighbouring groups.  The paper uses it **only while
fine-tuning**; inference runs full attention.  Here that is ``train_only=True`` (default): S²-Attn runs when the
attention module is in training mode (``model.train()``), anything else is the model's own dense attention, exactly.

Which formulation, and why it is exact.  The paper's code has two versions.  The one used for training (flash-attn,
``forward_flashattn``) does not roll tokens: it calls variable-length causal attention with segment boundaries at
``0, G, 2G, ...`` for the first half of the heads and at ``G/2, 3G/2, ...`` for the second half, so the shifted
heads' first and last segments are half groups and nothing wraps around.  The reference version
(``forward_noflashattn``) rolls q/k/v by ``-G/2`` and masks causally in the rolled order, so its last group mixes
the sequence's end with its beginning: the first ``G/2`` tokens can see the last ``G/2`` tokens (a causality leak
the flash version does not have).  We implement the flash version directly as block lists on the block-sparse
kernel: a query block reads the key blocks of its own segment, and the kernel's causal rule does the rest.  This is
exact at token level whenever segment boundaries fall on block boundaries, so the block size is the largest
divisor of ``G / 2`` (and of ``G``) not above ``block_size``; when that is not a block the Triton kernel takes
(``G = 70``: 2), the tokens are spread so that every half group starts on a kernel block, the gaps being padding
keys under a ``-inf`` column bias (``_shared.PieceLayout``), which is still exact.  ``s2_attention_reference`` below is the paper's
algorithm in plain torch (segment by segment), the test oracle.

Gradients flow through the kernel (Triton backward on GPU, autograd through the torch reference on CPU).  Calls
against a KV cache (decoding), sliding-window layers and ``dense_layers`` always run dense; a decode step given
``KeyBounds`` (a static cache, a padded batch) is the model's own attention with the mask as is, as ``dense``
runs it (no host read: it compiles whole).  ``state.stats``
reports ``density`` (fraction of the causally allowed key blocks read).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import option
from ..kernels.blocksparse import block_sparse_attention, density_tensor
from ..registry import register_method
from ._rows import run_by_rows
from ._shared import (
    GroupedConfig,
    GroupedState,
    cached_group_lists,
    group_size_for,
    grouped_blocks,
    training_attention_active,
)
from ._sparse import dense_call, record_dense_call, sparse_reason

PAPER = ("Chen et al., LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models (ICLR 2024), "
         "arXiv 2309.12307")


@dataclass(kw_only=True)
class LongLoRAConfig(GroupedConfig):
    shift: bool = option(True, "shift the groups of the second half of the heads by half a group (paper: True)")

    # One group covering the whole sequence and no shift is full causal attention, in training mode too.
    DENSE_EQUIVALENT: ClassVar[dict] = {"group_size_ratio": 1.0, "shift": False, "train_only": False}

    def validate(self) -> None:
        super().validate()
        if self.shift and self.group_size is not None and self.group_size % 2:
            raise ValueError(f"{self.where('group_size')} must be even with shift=True (the shifted heads move by "
                             f"half a group), got {self.group_size}")


def segment_unit(group: int, shift: bool) -> int:
    """Tokens between neighbouring segment boundaries of any head: half a group with the shift, else a group."""
    if shift and group % 2:
        raise ValueError(f"S2-Attn: the group size {group} must be even to shift by half a group; "
                         "pick a sequence length / group_size_ratio giving an even group")
    return group // 2 if shift else group


def aligned_block(group: int, shift: bool, block_size: int) -> int:
    """Largest block size <= ``block_size`` on which every segment boundary falls (exactness of block lists)."""
    return math.gcd(segment_unit(group, shift), block_size)


def segment_ids(seq_len: int, group: int, shifted: bool, device=None) -> torch.Tensor:
    """``[N]`` segment of each token: ``x // G``, or ``(x + G/2) // G`` for shifted heads (flash version)."""
    pos = torch.arange(seq_len, device=device)
    return torch.div(pos + (group // 2 if shifted else 0), group, rounding_mode="floor")


def s2_block_mask(seq_len: int, group: int, block: int, heads: int, shift: bool, device=None,
                  starts: torch.Tensor | None = None) -> torch.Tensor:
    """bool ``[1, H, NQ, NK]``: query block m reads key block j iff both lie in the same segment and j <= m.

    ``starts``: the token at the start of each block (default every ``block`` tokens; a ``PieceLayout``'s blocks)."""
    if starts is None:
        starts = torch.arange(0, seq_len, block, device=device)
    causal = starts[None, :] <= starts[:, None]
    masks = []
    for shifted in (False, True):
        seg = segment_ids(seq_len, group, shifted and shift, device)[starts]
        masks.append((seg[:, None] == seg[None, :]) & causal)
    first_shifted = heads // 2
    per_head = [masks[1] if h >= first_shifted else masks[0] for h in range(heads)]
    return torch.stack(per_head)[None]


@dataclass
class LongLoRAState(GroupedState):
    """The latest training shape's block lists."""


# ---- reference (the paper's algorithm, plain torch) --------------------------------------------------------------
def s2_attention_reference(query, key, value, group: int, *, shift: bool = True, scale: float | None = None):
    """LongLoRA's flash-attn S²-Attn, segment by segment with dense causal softmax (tests; O(N * G)).

    query ``[B, Hq, N, D]``, key/value ``[B, Hkv, N, D]``; returns ``[B, Hq, N, D]`` in fp32 or fp64.
    """
    heads, seq_len, dim = query.shape[1:]
    group_kv = heads // key.shape[1]
    key, value = key.repeat_interleave(group_kv, 1), value.repeat_interleave(group_kv, 1)
    scale = dim ** -0.5 if scale is None else scale
    out = torch.zeros_like(query)
    for h in range(heads):
        offset = group // 2 if (shift and h >= heads // 2) else 0
        bounds = [0, *range(offset or group, seq_len, group), seq_len]
        for lo, hi in itertools.pairwise(bounds):
            if hi <= lo:
                continue
            q, k, v = (t[:, h, lo:hi] for t in (query, key, value))
            scores = (q @ k.transpose(-1, -2)) * scale
            causal = torch.ones(hi - lo, hi - lo, dtype=torch.bool, device=q.device).tril()
            out[:, h, lo:hi] = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v
    return out


@register_method(
    "longlora",
    config=LongLoRAConfig,
    category="other",
    families=("llm", "lvlm"),
    needs_finetune=True,
    patterns=("causal-self",),
    paper=PAPER,
    state_cls=LongLoRAState,
    key_bounds=True,
)
def longlora_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, key_bounds=None,
                       **kwargs):
    """LongLoRA S²-Attn in training (grouped causal attention, half the heads shifted); full attention otherwise."""
    state = module.patchattn
    config = state.config
    q_len, kv_len = query.shape[2], key.shape[2]
    # A one-token step (``key_bounds``: the mask already hides padding and empty slots) is one group: dense.
    if key_bounds is not None or not training_attention_active(module, config, q_len, kv_len):
        state.record(density=1.0)
        return dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    reason, spans = sparse_reason(state, attention_mask, q_len, kv_len, kwargs)
    if reason is not None:
        record_dense_call(state, "longlora", reason, q_len, kv_len, kwargs)
        return dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    def run(q, k, v):  # unpadded rows: the groups start at each row's first token, as they would alone
        return _shifted_group_attention(state, q, k, v, scaling, kwargs.get("softcap")).transpose(1, 2)

    if spans is None:
        return run(query, key, value), None
    return run_by_rows(state, query, key, value, spans, run), None


def _shifted_group_attention(state, query, key, value, scaling, softcap):
    """S2-Attn on unpadded rows: ``[B, Hq, T, D]``."""
    config = state.config
    heads, q_len = query.shape[1], query.shape[2]
    group = group_size_for(config, q_len)
    block, layout = grouped_blocks(q_len, segment_unit(group, config.shift), config.block_size)
    bias = None
    if layout is not None:  # segment boundaries off the kernel's blocks: run on tokens spread onto whole blocks
        query, key, value = layout.spread(query), layout.spread(key), layout.spread(value)
        bias = layout.key_bias(query.device)[None, None]
    starts = None if layout is None else layout.block_tokens(query.device)
    length = query.shape[2]
    lists_key = (q_len, group, block, heads, config.shift, query.device)
    kv_indices, kv_counts = cached_group_lists(
        state, lists_key, lambda: s2_block_mask(q_len, group, block, heads, config.shift, query.device, starts))
    out = block_sparse_attention(query, key, value, kv_indices, kv_counts, block_q=block, block_k=block, causal=True,
                                 scale=scaling, softcap=softcap, col_bias=bias, backend=config.backend)
    state.record(density=density_tensor(kv_counts, length, length, block, block, causal=True))
    return out if layout is None else layout.gather(out)
