"""Helpers for tests and examples: inputs for the tiny models, comparison with a readable report."""

from __future__ import annotations

import torch

from .models import TINY_CONFIGS, tiny_model

LLM_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
LVLM_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "smolvlm")
assert set(LLM_FAMILIES + LVLM_FAMILIES) == set(TINY_CONFIGS)


def _image_tokens(model, family: str) -> tuple[int, dict]:
    """(number of image placeholder tokens, extra forward kwargs) for one 16x16 image per sample."""
    config = model.config
    if family == "llava":
        v = config.vision_config
        return (v.image_size // v.patch_size) ** 2, {}
    if family == "gemma3":
        return config.mm_tokens_per_image, {}
    if family in ("idefics3", "smolvlm"):
        v = config.vision_config
        return (v.image_size // v.patch_size) ** 2 // config.scale_factor**2, {}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        v = config.vision_config
        grid = torch.tensor([[1, 4, 4]])
        return int(grid.prod()) // v.spatial_merge_size**2, {"image_grid_thw": grid}
    raise ValueError(family)


def tiny_inputs(model, family: str, *, batch: int = 2, text_len: int = 12, with_image: bool = True, seed: int = 0):
    """Random forward kwargs (``input_ids`` and, for LVLMs, one image per sample) for a tiny model."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, text_len), generator=gen)
    if family in LLM_FAMILIES or not with_image:
        return {"input_ids": ids}
    n_image, extra = _image_tokens(model, family)
    image_token = model.config.image_token_id
    prefix = ids[:, :2]
    ids = torch.cat([prefix, torch.full((batch, n_image), image_token), ids[:, 2:]], dim=1)
    kwargs = {"input_ids": ids, **{k: v.repeat(batch, 1) for k, v in extra.items()}}
    # The processors' token-type ids: 1 marks image tokens (M-RoPE for Qwen-VL, bidirectional image mask for Gemma3).
    token_types = (ids == image_token).long()
    if family in ("qwen2_vl", "qwen2_5_vl"):
        kwargs["mm_token_type_ids"] = token_types
        v = model.config.vision_config
        patch_dim = 3 * v.temporal_patch_size * v.patch_size**2
        kwargs["pixel_values"] = torch.randn(batch * 16, patch_dim, generator=gen)
    else:
        if family == "gemma3":
            kwargs["token_type_ids"] = token_types
        size = model.config.vision_config.image_size
        kwargs["pixel_values"] = torch.randn(batch, 3, size, size, generator=gen)
        if family in ("idefics3", "smolvlm"):  # [B, images per sample, C, H, W]
            kwargs["pixel_values"] = kwargs["pixel_values"][:, None]
    return kwargs


def left_pad(inputs: dict, pad_lengths: list[int], pad_id: int = 0) -> dict:
    """Left-pad each row by ``pad_lengths[i]`` (dropping as many trailing tokens, so the width stays the same) and
    add the matching ``attention_mask``.  Every per-token tensor (token-type ids) is shifted the same way."""
    ids = inputs["input_ids"]
    width = ids.shape[1]

    def shift(tensor, fill):
        rows = [torch.cat([torch.full((pad,), fill), row[: width - pad]]) for row, pad in zip(tensor, pad_lengths)]
        return torch.stack(rows)

    per_token = {k: shift(v, 0) for k, v in inputs.items() if torch.is_tensor(v) and v.shape == ids.shape}
    mask = torch.stack([(torch.arange(width) >= pad).long() for pad in pad_lengths])
    return {**inputs, **per_token, "input_ids": shift(ids, pad_id), "attention_mask": mask}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


__all__ = ["LLM_FAMILIES", "LVLM_FAMILIES", "left_pad", "max_abs_diff", "tiny_inputs", "tiny_model"]
