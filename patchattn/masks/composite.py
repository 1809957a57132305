"""EE-MLLM's composite attention mask for an LVLM's text backbone, and its block lists for the engine.

Rule (True = visible), for query position ``i`` and key position ``j`` of one sequence:

- a text query sees what the model's own mask lets it see (causal, padding, sliding window): all earlier visual and
  text tokens, as in LLaVA;
- a visual query sees only itself (``visual_sees_text=False``, the paper's aligner: each visual token is updated by
  the layer's own value/output projections and MLP, no attention to anything else), or itself plus the earlier text
  tokens the model's mask allows (``visual_sees_text=True``, a variant);
- so every visual x visual pair except the diagonal is hidden: the ``N_v^2`` term of the cost is gone, and the
  engine skips those tiles (only the diagonal tiles of an image span are read, as partial tiles).

Several images per prompt (any number of image spans), per-row layouts (a padded batch) and any bool mask of the
model (Gemma 3's bidirectional image blocks, sliding windows) are handled by ANDing the rule into the model's mask.
"""

from __future__ import annotations

import torch

from .tiles import tiles_from_token_mask

__all__ = ["composite_block_lists", "composite_token_mask"]


def composite_token_mask(image: torch.Tensor, q_len: int, allowed: torch.Tensor | None = None, *,
                         visual_sees_text: bool = False) -> torch.Tensor:
    """bool ``[B, Tq, Tk]``: the composite rule over the keys, ANDed with ``allowed``.

    ``image``: bool ``[B, Tk]`` (True = visual token) over the keys; the queries are the last ``q_len`` keys.
    ``allowed``: bool ``[B, Tq, Tk]`` (the model's own mask), or None for plain causal attention.
    """
    if image.dim() != 2 or image.dtype != torch.bool:
        raise ValueError(f"image: got {tuple(image.shape)} {image.dtype}; allowed: bool [B, Tk]")
    batch, k_len = image.shape
    dev = image.device
    q_pos = torch.arange(q_len, device=dev) + (k_len - q_len)
    k_pos = torch.arange(k_len, device=dev)
    if allowed is None:
        allowed = (k_pos[None, :] <= q_pos[:, None]).expand(batch, q_len, k_len)
    elif tuple(allowed.shape) != (batch, q_len, k_len) or allowed.dtype != torch.bool:
        raise ValueError(f"allowed: got {tuple(allowed.shape)} {allowed.dtype}; allowed: bool [{batch}, {q_len}, "
                         f"{k_len}]")
    visual_query = image[:, q_pos][:, :, None]
    own = (q_pos[:, None] == k_pos[None, :])[None]
    visual_row = own | (~image[:, None, :] if visual_sees_text else torch.zeros_like(own))
    return allowed & (~visual_query | visual_row)


def composite_block_lists(mask: torch.Tensor, block: int):
    """Per-row block lists of a ``[B, Tq, Tk]`` mask, as ``block_sparse_attention`` takes them (``B' = B``).

    Returns ``(kv_indices [B, 1, NQ, K], kv_counts [B, 1, NQ], tile_mask_ids [B, 1, NQ, K], tile_masks [P, bq, bk],
    tile_density)``: whole tiles id -1, partial tiles (image diagonals, image/text edges) stored once each.
    Building reads the ``B x Tq x Tk`` mask once (a prefill's layout is built once and shared by every layer).
    """
    tiled = tiles_from_token_mask(mask, block, block)  # the batch rides on the head axis: lists [1, B, NQ, K]
    swap = (lambda t: t.transpose(0, 1).contiguous())
    return swap(tiled.kv_indices), swap(tiled.kv_counts), swap(tiled.tile_mask_ids), tiled.tile_masks, \
        tiled.tile_density()
