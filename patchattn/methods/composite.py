"""``composite`` — EE-MLLM's composite attention in an LVLM's text backbone: text tokens attend causally to
everything before them, visual tokens attend to no other visual token (each only to itself).

Paper: Ma et al., EE-MLLM: A Data-Efficient and Compute-Efficient Multimodal Large Language Model (arXiv
2408.11795).  Training-free as EE-MLLM-F (the mask on an existing self-attention LVLM); ``recipes/composite`` tunes
LoRA under it.

What a call does (the rule: ``patchattn/masks/composite.py``):

- a prefill with image tokens (``context.layout.image_token_mask``, set by the adapter from ``input_ids``): one
  block-sparse engine call whose per-row lists read, for a visual query block, only the diagonal tile(s) of its image
  span (partial tiles) and, for a text query block, every causally visible block; visual x visual tiles off the
  diagonal are never read.  The model's own bool mask (padding, sliding window, Gemma 3's image blocks) is ANDed in;
  rows of a padded batch get their own lists.  The lists are built once per prefill and shared by every layer;
- a call without image tokens (text-only prompt) and a decode step (one new text token over the cache): the model's
  own dense attention, exactly (text rows are causal dense).

There is no dense-equivalent setting by design: the method *is* the removal of visual x visual attention.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..config import MethodConfig, option
from ..kernels.blocksparse import block_sparse_attention
from ..kernels.dense import eager_attention, sdpa_attention
from ..masks.composite import composite_block_lists, composite_token_mask
from ..registry import register_method
from ._perforward import has_image

PLAN_CACHE = 4  # prefill layouts kept (each holds its masks alive, so identity keys cannot be reused)


@dataclass(kw_only=True)
class CompositeConfig(MethodConfig):
    """Which keys a visual query sees, and the engine's block size."""

    visual_sees_text: bool = option(False, "visual tokens also attend to the earlier text tokens (a variant; the "
                                    "paper's aligner: each visual token sees only itself)")
    block: int = option(64, "tokens per block of the block-sparse engine (a power of two >= 16)", min=16, max=256)

    def validate(self) -> None:
        if self.block & (self.block - 1):
            raise ValueError(f"{self.where('block')} must be a power of two, got {self.block}")


@dataclass(frozen=True, eq=False)
class CompositePlan:
    """The engine's lists for one prefill layout (shared by every layer that sees the same masks)."""

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    tile_mask_ids: torch.Tensor
    tile_masks: torch.Tensor
    density: float  # visible pairs / pairs the model's own mask allows
    tile_density: float  # tiles read / all tiles


_PLANS: OrderedDict = OrderedDict()  # (image mask, model mask, sizes, settings) by identity -> (tensors kept, plan)


def _model_mask(attention_mask, batch: int, q_len: int, k_len: int) -> torch.Tensor | None:
    """The model's mask as bool ``[B, Tq, Tk]`` (None: plain causal).  Per-head masks are refused."""
    if attention_mask is None:
        return None
    if attention_mask.ndim != 4 or attention_mask.shape[1] != 1:
        raise NotImplementedError(f"patchattn composite: attention masks [B, 1, Tq, Tk] only, got "
                                  f"{tuple(attention_mask.shape)}")
    visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1e4
    return visible[:, 0].expand(batch, q_len, k_len)


@torch.compiler.disable  # host-side list building, once per prefill
def plan_for(image: torch.Tensor, attention_mask, config: CompositeConfig, batch: int, q_len: int,
             k_len: int) -> CompositePlan:
    key = (id(image), id(attention_mask), batch, q_len, k_len, config.visual_sees_text, config.block)
    hit = _PLANS.get(key)
    if hit is not None and hit[0][0] is image and hit[0][1] is attention_mask:
        _PLANS.move_to_end(key)
        return hit[1]
    allowed = _model_mask(attention_mask, batch, q_len, k_len)
    mask = composite_token_mask(image.expand(batch, k_len), q_len, allowed, visual_sees_text=config.visual_sees_text)
    kv_indices, kv_counts, ids, tiles, tile_density = composite_block_lists(mask, config.block)
    base = allowed.sum() if allowed is not None else batch * (q_len * (q_len + 1) // 2 + q_len * (k_len - q_len))
    plan = CompositePlan(kv_indices, kv_counts, ids, tiles, float(mask.sum()) / max(1, int(base)), tile_density)
    _PLANS[key] = ((image, attention_mask), plan)
    while len(_PLANS) > PLAN_CACHE:
        _PLANS.popitem(last=False)
    return plan


def image_keys(state, batch: int, q_len: int, k_len: int) -> torch.Tensor | None:
    """bool ``[B or 1, Tk]``: which keys are visual tokens, or None when this call needs no composite mask (no image,
    or a decode step: its one new token is text, and text rows are causal dense)."""
    image = state.context.layout.image_token_mask
    if image is None or q_len == 1:
        return None
    if image.shape[-1] != k_len:
        raise NotImplementedError(
            f"patchattn composite: the image-token layout covers {image.shape[-1]} tokens but this call has {q_len} "
            f"queries over {k_len} keys; a prefill continued over a KV cache (chunked prefill) is not supported: "
            "prefill the whole prompt in one call")
    if image.shape[0] not in (1, batch):
        raise ValueError(f"patchattn composite: image-token mask for {image.shape[0]} rows, the call has {batch}")
    return image if has_image(state.context, image) else None  # one host read per forward, not per layer


def _dense(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    module.patchattn.record(density=1.0)
    if kwargs.get("softcap") is not None:
        return eager_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@register_method(
    "composite",
    config=CompositeConfig,
    category="other",  # a modality mask, not a density-knob sparse method
    families=("lvlm",),
    patterns=("causal-self",),
    paper="Ma et al., EE-MLLM: A Data-Efficient and Compute-Efficient Multimodal Large Language Model "
          "(arXiv 2408.11795); training-free as EE-MLLM-F",
)
def composite_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """EE-MLLM composite attention: text attends causally to all, visual tokens only to themselves."""
    state = module.patchattn
    config: CompositeConfig = state.config
    batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
    image = image_keys(state, batch, q_len, k_len)
    if image is None:
        return _dense(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    if dropout and module.training:
        raise NotImplementedError("patchattn composite: attention dropout is not supported (the engine has none); "
                                  "set the model's attention_dropout to 0")
    plan = plan_for(image.to(query.device), attention_mask, config, batch, q_len, k_len)
    state.record(density=plan.density, tile_density=plan.tile_density)
    out = block_sparse_attention(query, key, value, plan.kv_indices, plan.kv_counts, block_q=config.block,
                                 block_k=config.block, causal=False, scale=scaling, softcap=kwargs.get("softcap"),
                                 tile_masks=plan.tile_masks, tile_mask_ids=plan.tile_mask_ids,
                                 backend=config.backend)
    return out.transpose(1, 2), None
