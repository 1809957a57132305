"""Synthetic transformer inputs for DiT distillation: random latents on the family's latent grid, random text
embeddings of the family's width, random timesteps (and whatever else the family's forward requires).

No data set and no text encoder: the student learns to match the dense teacher on the inputs the transformer
takes, so a run needs nothing but the transformer.  What each input is drawn from:

- latents: standard normal (pure noise is what a flow-matching / diffusion model sees at t = 1; the model sees
  the same distribution at every step here -- a deviation from training on real noised latents);
- text embeddings: standard normal of the family's width; pooled embeddings likewise;
- timesteps: uniform in ``timestep_range`` (fractions of the schedule), times the family's scale (FLUX takes
  ``t / 1000`` in [0, 1]; the others take [0, 1000]);
- FLUX / HunyuanVideo guidance (guidance-distilled checkpoints only): uniform in [1, 5].

Every batch is a pure function of its generator's seed, so a step's batch is fixed by ``(seed, step)``.
"""

from __future__ import annotations

import math

import torch

from ..adapters.diffusers import family_of

# What the transformer's ``timestep`` argument spans: FLUX pipelines pass t / 1000, the others t in [0, 1000].
TIMESTEP_SCALE = {"flux": 1.0}
DEFAULT_TIMESTEP_SCALE = 1000.0


def _patch_sizes(config, family) -> tuple[int, int, int]:
    from ..adapters.diffusers import _config_value  # the family table's patch-size reader

    return tuple(_config_value(config, p) for p in family.patch)


def _randn(generator, *shape, dtype):
    return torch.randn(*shape, generator=generator).to(dtype)


def _rand(generator, *shape, low=0.0, high=1.0):
    return low + (high - low) * torch.rand(*shape, generator=generator)


def check_grid(family_name: str, grid) -> tuple[int, int, int]:
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be [frames, height, width] in latent tokens (positive), got {list(grid)}")
    if family_name in ("flux", "sd3", "pixart") and grid[0] != 1:
        raise ValueError(f"{family_name} is an image model: the grid's frames must be 1, got {list(grid)}")
    return grid


def synthetic_inputs(transformer, grid, n_text: int, batch: int, generator: torch.Generator,
                     timestep_range=(0.0, 1.0), dtype=torch.float32) -> dict:
    """Keyword arguments of ``transformer.forward`` for ``batch`` random samples on ``grid`` (tokens, after
    patchify) with ``n_text`` text tokens; drawn on the CPU from ``generator`` (move them with ``to_device``)."""
    family = family_of(transformer)
    name, config = family.name, transformer.config
    frames, height, width = check_grid(name, grid)
    pt, ph, pw = _patch_sizes(config, family)
    low, high = timestep_range
    t = _rand(generator, batch, low=low, high=high) * TIMESTEP_SCALE.get(name, DEFAULT_TIMESTEP_SCALE)
    channels = config["in_channels"]

    def text(dim: int) -> torch.Tensor:
        return _randn(generator, batch, n_text, dim, dtype=dtype)

    if name == "flux":
        ids = torch.zeros(height, width, 3)
        ids[..., 1], ids[..., 2] = torch.arange(height)[:, None], torch.arange(width)[None]
        out = dict(hidden_states=_randn(generator, batch, height * width, channels, dtype=dtype),
                   encoder_hidden_states=text(config["joint_attention_dim"]),
                   pooled_projections=_randn(generator, batch, config["pooled_projection_dim"], dtype=dtype),
                   timestep=t.to(dtype), img_ids=ids.reshape(-1, 3).to(dtype), txt_ids=torch.zeros(n_text, 3, dtype=dtype))
        if config.get("guidance_embeds"):
            out["guidance"] = _rand(generator, batch, low=1.0, high=5.0).to(dtype)
        return out
    if name in ("sd3", "pixart"):
        latent = _randn(generator, batch, channels, height * ph, width * pw, dtype=dtype)
        if name == "sd3":
            return dict(hidden_states=latent, encoder_hidden_states=text(config["joint_attention_dim"]),
                        pooled_projections=_randn(generator, batch, config["pooled_projection_dim"], dtype=dtype),
                        timestep=t.to(dtype))
        return dict(hidden_states=latent, encoder_hidden_states=text(config["caption_channels"]),
                    timestep=t.round().long(), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if name == "cogvideox":
        latent = _randn(generator, batch, frames * pt, channels, height * ph, width * pw, dtype=dtype)
        return dict(hidden_states=latent, encoder_hidden_states=text(config["text_embed_dim"]),
                    timestep=t.round().long())
    if name in ("wan", "hunyuan_video"):
        latent = _randn(generator, batch, channels, frames * pt, height * ph, width * pw, dtype=dtype)
        if name == "wan":
            return dict(hidden_states=latent, encoder_hidden_states=text(config["text_dim"]), timestep=t.round().long())
        out = dict(hidden_states=latent, encoder_hidden_states=text(config["text_embed_dim"]), timestep=t.round().long(),
                   pooled_projections=_randn(generator, batch, config["pooled_projection_dim"], dtype=dtype),
                   encoder_attention_mask=torch.ones(batch, n_text, dtype=torch.long))
        if config.get("guidance_embeds"):
            out["guidance"] = _rand(generator, batch, low=1.0, high=5.0).to(dtype) * 1000
        return out
    if name == "ltx_video":
        tokens = frames * height * width
        return dict(hidden_states=_randn(generator, batch, tokens, channels, dtype=dtype),
                    encoder_hidden_states=text(config["caption_channels"]), timestep=t.round().long(),
                    encoder_attention_mask=torch.ones(batch, n_text, dtype=torch.long),
                    num_frames=frames * pt, height=height * ph, width=width * pw)
    raise NotImplementedError(f"no synthetic inputs for DiT family {name!r} yet (add a branch in {__name__})")


def default_text_length(transformer, requested: int | None) -> int:
    """CogVideoX's positional embedding is built for ``max_text_seq_length`` text tokens: that length, else
    ``requested`` (which the caller must give)."""
    family = family_of(transformer)
    if family.name == "cogvideox":
        fixed = int(transformer.config["max_text_seq_length"])
        if requested is not None and requested != fixed:
            raise ValueError(f"cogvideox takes exactly max_text_seq_length={fixed} text tokens, got n_text={requested}")
        return fixed
    if requested is None:
        raise ValueError(f"{family.name}: give n_text (text tokens per sample) in train.json")
    return requested


def to_device(inputs: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def tokens_of(grid) -> int:
    return math.prod(grid)
