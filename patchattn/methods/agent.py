"""``agent`` — Agent Attention for DiTs, training-free as in AgentSD: a few agent tokens sit between the queries
and the keys, so one call costs O(n·a) instead of O(n²).

Paper: Han et al., Agent Attention: On the Integration of Softmax and Linear Attention (ECCV 2024, arXiv 2312.08874);
code LeapLabTHU/Agent-Attention (``agentsd/patch.py`` for the training-free Stable Diffusion variant).

What an image/video query of a self or joint call gets (``agent_reference`` below is the same maths, unbatched):

- agents ``A``: the image queries average-pooled on the latent grid, one agent per ``pool`` cell (AgentSD merges one
  agent per ``sx x sy = 4 x 4`` cell of the tokens its attention sees, with ``to_q`` of the merged tokens: ``to_q``
  is linear, so that is a pooled query);
- agent aggregation ``V_A = softmax(A Kᵀ · scale) V`` over every key (text keys of a joint call included, the
  model's key-padding mask honoured), then broadcast ``O = softmax(Q Aᵀ · scale^k_scale2) V_A + k_shortcut · V``
  (AgentSD's flatter second softmax, ``k_scale2 = 0.3``, and its value shortcut ``k_shortcut = 0.075``);
- both softmaxes are SDPA calls (``scale=`` carries the temperatures).

Text queries of a joint call (FLUX, SD3, CogVideoX, HunyuanVideo) keep dense attention over every key; cross
attention (Wan, PixArt, LTX ``attn2``: text keys only) stays dense, as AgentSD's ``attn2`` (its merge is off there).

Schedule (AgentSD's sampler): agent attention in the first 40% of the denoising steps (steps 0-19 of its 50 PLMS
steps), dense afterwards -- from step 20 AgentSD asks for 50% agents, which its own rule "agents only when fewer
than half the tokens" turns into plain attention -- on every layer (AgentSD's ``max_downsample=1`` picks the
UNet's full-resolution blocks; a DiT has one resolution).  The rule stays: a call whose agents would be half its
image tokens or more runs dense, so ``pool=1`` (one agent per token) is the dense-equivalent setting, exact.

Deviations: no ToMe token merging (AgentSD runs it beside the agents), no agent biases or depthwise conv (AgentSD
has neither; the trained ViTs do); agents are pooled queries after the model's QK-norm and RoPE (SDPA's inputs),
plain average pooling on the grid instead of ToMe's similarity-based merging into a random token per cell.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import option
from ..registry import register_method
from ._dit import DiTCall, DiTScheduleConfig, dense_call, dit_call, runs_dense

AXES = 3


@dataclass(kw_only=True)
class AgentConfig(DiTScheduleConfig):
    """Agent tokens pooled from the image queries; AgentSD's temperatures, shortcut and step schedule."""

    pool: int | list = option([1, 4, 4], "pooling cell per axis (frames, height, width; 2 values: height, width) -- "
                              "one agent per cell (AgentSD: 4x4); 1: one agent per token (dense)", min=1)
    agent_grid: int | list = option([], "pooled grid in agents per axis, overriding pool (e.g. [7, 7]: the ViT "
                                    "paper's 49 agents; one value: every axis, capped by the grid)", min=1)
    k_scale2: float = option(0.3, "the second softmax (queries over agents) uses scale ** k_scale2 (AgentSD 0.3: "
                             "flatter)", min=0.0, max=1.0)
    k_shortcut: float = option(0.075, "adds k_shortcut * V to each image query's output (AgentSD 0.075)", min=0.0)
    agent_until: float = option(0.4, "fraction of the denoising steps, from the first, run with agents; later steps "
                                "dense (AgentSD: steps 0-19 of 50); 1.0: every step (needs the step count otherwise: "
                                "a patched pipeline, or set_denoising_steps)", min=0.0, max=1.0)

    DENSE_EQUIVALENT: ClassVar[dict] = {"pool": 1}

    def validate(self) -> None:
        super().validate()
        for name in ("pool", "agent_grid"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and len(value) > AXES:
                raise ValueError(f"{self.where(name)} takes at most {AXES} values (frames, height, width), got {value}")
            if isinstance(value, (list, tuple)) and any(isinstance(v, bool) or not isinstance(v, int) for v in value):
                raise ValueError(f"{self.where(name)} must hold positive integers, got {value}")


def per_axis(value, grid: tuple[int, int, int], name: str) -> tuple[int, int, int]:
    """One value for all axes, 3 values, or 2 (height, width; the frames axis gets 1)."""
    if not isinstance(value, (list, tuple)):
        return (value,) * AXES
    if len(value) == 1:
        return (value[0],) * AXES
    if len(value) == AXES:
        return tuple(value)
    if len(value) == 2:
        return (1, *value)
    raise ValueError(f"agent: {name} {list(value)} must have 1, 2 (height, width) or 3 (frames, height, width) values "
                     f"for the grid {grid}")


def agent_grid_for(config: AgentConfig, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """The pooled grid of this call: ``agent_grid`` (capped by the grid), else ``ceil(extent / pool)`` per axis."""
    if isinstance(config.agent_grid, int) or config.agent_grid:
        return tuple(min(a, g) for a, g in zip(per_axis(config.agent_grid, grid, "agent_grid"), grid))
    return tuple(math.ceil(g / p) for g, p in zip(grid, per_axis(config.pool, grid, "pool")))


def agents_run(config: AgentConfig, call: DiTCall, n_agents: int) -> bool:
    """AgentSD's rule: agents only when they are fewer than half the tokens, and only in its agent steps."""
    if 2 * n_agents >= call.n_image:
        return False
    if config.agent_until >= 1.0 or call.step is None:
        return True
    if call.num_steps is None:
        if torch.compiler.is_compiling():  # warnings.warn breaks the graph (every call); an eager call warns
            return True
        warnings.warn("agent: agent_until < 1 needs the number of denoising steps (patch the pipeline, or call "
                      "patchattn.set_denoising_steps(model, n)); every step runs agent attention", stacklevel=3)
        return True
    return call.step < config.agent_until * call.num_steps


def pooled_agents(image_queries: torch.Tensor, grid: tuple[int, int, int], agent_grid) -> torch.Tensor:
    """``[B, H, a, D]`` agents, contiguous: the image queries ``[B, H, n, D]`` (row-major over ``grid``) average-pooled.

    Contiguous because the pooling works channels-first: without the copy the agents would be a view whose last
    dimension has stride ``a``, and every fused SDPA kernel (flash, memory-efficient, cuDNN; the CPU's flash too)
    needs stride 1 there, so both SDPA calls fell back to the math path and built ``[B, H, a, T]`` scores (74 GiB at
    HunyuanVideo 720p; design note 43)."""
    b, h, _, d = image_queries.shape
    volume = image_queries.reshape(b * h, *grid, d).permute(0, 4, 1, 2, 3)
    pooled = F.adaptive_avg_pool3d(volume, agent_grid)
    return pooled.permute(0, 2, 3, 4, 1).reshape(b, h, -1, d).contiguous()


def _key_mask(attention_mask):
    """The model's mask as one that broadcasts over any query count (key padding), or NotImplementedError.

    Its last dimension gets stride 1 (a copy of ``B x H x Tk`` values at most): the GPU's fused kernels need that of
    a mask too, the CPU's do not (so a CPU run cannot show it)."""
    if attention_mask is None:
        return None
    if attention_mask.ndim != 4 or attention_mask.shape[2] != 1:
        raise NotImplementedError(f"agent: supports masks of the keys only ([B, 1|H, 1, Tk]: key padding), got a mask "
                                  f"of shape {tuple(attention_mask.shape)}")
    return attention_mask if attention_mask.stride(-1) == 1 else attention_mask.contiguous()


def agent_attention(query, key, value, call: DiTCall, agent_grid, *, scale, k_scale2: float, k_shortcut: float,
                    attention_mask=None) -> torch.Tensor:
    """``[B, H, T, D]``: agent attention for the image queries, dense attention for the text queries."""
    start, stop = call.image
    if call.n_image + call.n_text != query.shape[2]:
        raise RuntimeError(f"agent: the layout covers {call.n_image} image and {call.n_text} text tokens, the call has "
                           f"{query.shape[2]} queries")
    image_q = query[:, :, start:stop]
    agents = pooled_agents(image_q, call.grid, agent_grid)
    agent_values = F.scaled_dot_product_attention(agents, key, value, attn_mask=attention_mask, scale=scale)
    image_out = F.scaled_dot_product_attention(image_q, agents, agent_values, scale=scale ** k_scale2)
    if k_shortcut:
        image_out = image_out + k_shortcut * value[:, :, start:stop]
    if not call.text:
        return image_out
    out = torch.empty_like(query)
    out[:, :, start:stop] = image_out
    for lo, hi in call.text:
        out[:, :, lo:hi] = F.scaled_dot_product_attention(query[:, :, lo:hi], key, value, attn_mask=attention_mask,
                                                          scale=scale)
    return out


@register_method(
    "agent",
    config=AgentConfig,
    category="linear",
    families=("dit",),
    patterns=("noncausal-self", "noncausal-cross"),
    paper="Han et al., Agent Attention: On the Integration of Softmax and Linear Attention (ECCV 2024, arXiv "
          "2312.08874); AgentSD (LeapLabTHU/Agent-Attention)",
)
def agent_forward(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, is_causal=False,
                  cross_attention=False, enable_gqa=False, **kwargs):
    """Agent attention (pooled-query agents, two softmaxes, O(n·a)) on DiT image tokens; text rows dense."""
    state = module.patchattn
    config: AgentConfig = state.config
    call = dit_call(state, query, cross_attention)
    dense = is_causal or runs_dense(config, call, "agent")
    if not dense:
        agent_grid = agent_grid_for(config, call.grid)
        dense = not agents_run(config, call, math.prod(agent_grid))
    if dense:
        return dense_call(state, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                          is_causal=is_causal, enable_gqa=enable_gqa)
    if dropout:
        raise NotImplementedError("agent: attention dropout is not supported; set the model's attention dropout to 0")
    if enable_gqa and key.shape[1] != query.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    n_agents = math.prod(agent_grid)
    state.record(density=n_agents / call.n_image, agents=n_agents)
    out = agent_attention(query, key, value, call, agent_grid, scale=scale, k_scale2=config.k_scale2,
                          k_shortcut=config.k_shortcut, attention_mask=_key_mask(attention_mask))
    return out.transpose(1, 2), None
