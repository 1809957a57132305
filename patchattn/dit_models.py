"""Base DiTs by name for DiT training runs: ``tiny-<family>`` (random, built from a config: no download) or a local
diffusers folder (a transformer folder, or a pipeline folder with a ``transformer/`` subfolder).

The tiny configs are also the ones the tests build (``tests/dit_cases.py`` reads them here), so a DiT recipe can be smoke-run
offline on every supported family.  Each tiny model also names a default latent grid (in tokens, after patchify)
and text length, used when a recipe does not give its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .config import closest
from .models import TINY_PREFIX, UnknownModelError


@dataclass(frozen=True)
class TinyDiT:
    """A tiny random DiT: its diffusers class, config, and a latent grid / text length that fit it."""

    cls: str
    config: dict
    grid: tuple[int, int, int]  # (frames, height, width) in tokens after patchify
    n_text: int


TINY_DITS: dict[str, TinyDiT] = {
    "flux": TinyDiT(
        "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
        (1, 8, 8), 5,
    ),
    "sd3": TinyDiT(
        "SD3Transformer2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
             pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
        (1, 8, 8), 5,
    ),
    "cogvideox": TinyDiT(
        "CogVideoXTransformer3DModel",
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
             text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
             temporal_compression_ratio=4, max_text_seq_length=6),
        (3, 4, 4), 6,
    ),
    "wan": TinyDiT(
        "WanTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        (2, 6, 6), 5,
    ),
    "pixart": TinyDiT(
        "PixArtTransformer2DModel",
        dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
             caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
             activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
             norm_elementwise_affine=False, norm_eps=1e-6),
        (1, 8, 8), 5,
    ),
    "hunyuan_video": TinyDiT(
        "HunyuanVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
             pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), guidance_embeds=False),
        (2, 4, 4), 5,
    ),
    "ltx_video": TinyDiT(
        "LTXVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
             cross_attention_dim=16, num_layers=2, caption_channels=16),
        (2, 4, 4), 5,
    ),
}


def tiny_dit_names() -> list[str]:
    return [TINY_PREFIX + f for f in TINY_DITS]


def is_tiny_dit(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(TINY_PREFIX) and name[len(TINY_PREFIX):] in TINY_DITS


def tiny_dit(family: str, *, seed: int = 0):
    """A tiny random DiT of ``family`` (a key of ``TINY_DITS``), fp32, eval mode; the same weights for a seed."""
    import diffusers  # optional: only DiT users install it

    if family not in TINY_DITS:
        raise UnknownModelError(f"no tiny DiT {family!r}; known: {', '.join(TINY_DITS)}")
    spec = TINY_DITS[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return getattr(diffusers, spec.cls)(**spec.config).eval()


def load_dit_base(name: str, dtype: str = "float32"):
    """The transformer of a DiT run, unpatched, in eval mode: ``tiny-<family>`` or a local diffusers folder."""
    torch_dtype = getattr(torch, dtype)
    if is_tiny_dit(name):
        model = tiny_dit(name[len(TINY_PREFIX):])
        return model if torch_dtype == torch.float32 else model.to(torch_dtype)
    if not isinstance(name, str) or not os.path.isdir(name):
        hint = closest(str(name), tiny_dit_names())
        raise UnknownModelError(f"unknown DiT {name!r}{f'; did you mean {hint!r}?' if hint else ''} Use a local "
                                f"diffusers folder (a transformer, or a pipeline with transformer/) or one of "
                                f"{', '.join(tiny_dit_names())} (random, for smoke runs); no hub downloads")
    import diffusers

    from .adapters.diffusers import read_saved_config

    subfolder = "transformer" if os.path.isfile(os.path.join(name, "transformer", "config.json")) else None
    cls = getattr(diffusers, read_saved_config(name, subfolder)["_class_name"])
    return cls.from_pretrained(name, subfolder=subfolder, torch_dtype=torch_dtype, local_files_only=True).eval()
