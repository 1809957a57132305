"""``gna`` — Generalized Neighborhood Attention for DiTs: each image/video token attends to its neighborhood on the
latent grid (NATTEN's NA with GNA's stride; HaloNet's blocked local attention is the stride-window case).

Papers: Hassani et al., Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light
(arXiv 2504.16922); Faster Neighborhood Attention (NeurIPS 2024, arXiv 2403.04690); Vaswani et al., Scaling Local
Self-Attention for Parameter Efficient Visual Backbones (HaloNets, CVPR 2021).

What a call does (``patchattn/masks/neighborhood.py`` has the definition and the plan):

- self attention (Wan ``attn1``, PixArt ``attn1``, SD3 ``attn2``) and joint attention (FLUX, SD3, CogVideoX): the
  grid's tokens are permuted into tiles (2D tiles such as 8x8, 3D such as 4x4x4; one tile = one block of the
  block-sparse engine), the engine reads, per query tile, the key tiles its neighborhoods touch (whole tiles as they
  are, partial ones through their element mask), and the output is permuted back.  Text tokens are NATTEN's
  "additional KV": text queries see everything and every image query sees the text; they sit in their own blocks,
  so the joint call is one engine call, not NATTEN's dense call plus a log-sum-exp merge;
- cross attention (Wan and PixArt ``attn2``: image queries, text keys) has no neighborhood: gna leaves it dense;
- the plan (permutation, block lists, partial tiles) is built once per (grid, text layout, settings, device),
  shared by every layer, and remembered in each module's ``GNAState``.

Defaults: the GNA paper's FLUX-4K setting (256x256 latent grid, window 80x80, stride 16x16) scaled to the call's
grid: window ``round(0.3125 * extent)`` and stride ``round(0.0625 * extent)`` per axis (FLUX 1024²'s 64x64 grid:
window 20x20, stride 4x4; about 90% sparse at every size).  An explicit ``window`` takes NATTEN's default stride 1
unless ``stride`` is given too.  ``window_fraction=1.0`` (windows covering the grid) is the dense-equivalent setting:
such calls run the model's own SDPA, exactly, with no warning.  ``granularity="tile"`` rounds the neighborhoods
outward to the tiles they touch (every listed tile whole but for padded keys; denser; design note 48).  Without it,
settings whose windows land on tile edges are already whole-tile exactly (the GNA paper's "perfectly block-sparse"
case: e.g. stride = tile and a window an odd multiple of the tile on a grid of whole tiles).

Deviations from NATTEN: a window larger than an axis covers the axis (NATTEN refuses ``kernel * dilation >
extent``); the tile shape is chosen per grid by counting listed and partial tiles (NATTEN's profiler searches tile
shapes by timing).  An ``attn_mask`` on a self/joint call (no tiny DiT family here passes one): a mask of the keys
only (padded text of a varlen batch, ``[B, 1, 1, T]``) becomes the engine's per-key bias, still one engine call;
any other mask runs a dense masked SDPA over the neighborhood mask, with a warning (the engine takes no arbitrary
mask).  Plans are kept process-wide (an LRU of 32) on the device they were built for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar

import torch

from ..config import option
from ..masks.neighborhood import GRANULARITIES, Neighborhood, NeighborhoodPlan, neighborhood_plan
from ..registry import register_method
from ..state import MethodState
from ._dit import DiTCall, DiTScheduleConfig, dense_call, dit_call, runs_dense, tiled_call

AXES = 3
PLAN_CACHE = 32  # plans kept process-wide (grids x text layouts x settings x devices)


@dataclass(kw_only=True)
class GNAConfig(DiTScheduleConfig):
    """Neighborhood per axis of the latent grid (frames, height, width); one value for all axes, or one per axis
    (2 values: height and width of a 2D grid, frames == 1)."""

    window: int | list = option([], "window (kernel size) in tokens per axis; empty: window_fraction of each axis",
                                min=1)
    window_fraction: float = option(0.3125, "window as a fraction of each axis when window is empty (the GNA "
                                    "paper's FLUX-4K 80/256); 1.0 covers the grid: dense", min=0.0, max=1.0)
    stride: int | list = option([], "queries in runs of stride share one window (1 sliding, window: blocked); "
                                "empty: stride_fraction of each axis with a scaled window, 1 with an explicit one",
                                min=1)
    stride_fraction: float = option(0.0625, "stride as a fraction of each axis when both window and stride are "
                                    "empty (the GNA paper's FLUX-4K 16/256)", min=0.0, max=1.0)
    dilation: int | list = option(1, "dilation per axis (DiNAT)", min=1)
    causal: bool | list = option(False, "causal per axis (e.g. [true, false, false]: causal in time)")
    tile: list = option([], "tile shape in tokens per axis (product a power of two >= 16); empty: chosen per grid")
    tile_tokens: int = option(64, "tokens per tile (= the engine's block) when tile is empty", min=16, max=256)
    granularity: str = option("token", "'token': the neighborhoods exactly (edges through partial tiles); 'tile': "
                              "each query tile reads every key tile its neighborhoods touch, whole (HaloNet-style "
                              "blocked local attention: denser, no partial tile but padded keys)",
                              choices=GRANULARITIES)

    DENSE_EQUIVALENT: ClassVar[dict] = {"window_fraction": 1.0}

    def validate(self) -> None:
        super().validate()
        for name in ("window", "stride", "dilation", "causal", "tile"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and len(value) > AXES:
                raise ValueError(f"{self.where(name)} takes at most {AXES} values (frames, height, width), got {value}")
        if self.window_fraction <= 0:
            raise ValueError(f"{self.where('window_fraction')} must be > 0, got {self.window_fraction}")
        if self.tile_tokens & (self.tile_tokens - 1):
            raise ValueError(f"{self.where('tile_tokens')} must be a power of two, got {self.tile_tokens}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in self.tile):
            raise ValueError(f"{self.where('tile')} must hold positive integers, got {self.tile}")
        if self.tile and (math.prod(self.tile) < 16 or math.prod(self.tile) & (math.prod(self.tile) - 1)):
            raise ValueError(f"{self.where('tile')} must hold a power of two >= 16 tokens, got {self.tile}")


@dataclass
class GNAState(MethodState):
    """Per module: the plans of the grids this module has seen, by (grid, layout, settings, device)."""

    plans: dict = field(default_factory=dict)


def per_axis(value, grid: tuple[int, int, int], name: str) -> tuple:
    """A config value for the call's ``(frames, height, width)`` grid: one for all axes, 3 values, or 2 (height,
    width) for a 2D grid."""
    if not isinstance(value, (list, tuple)):
        return (value,) * AXES
    if len(value) == 1:
        return (value[0],) * AXES
    if len(value) == AXES:
        return tuple(value)
    if len(value) == 2 and grid[0] == 1:  # the trivial frames axis: any setting covers it
        return (False if name == "causal" else 1, *value)
    raise ValueError(f"gna: {name} {list(value)} has {len(value)} values for the grid {grid} (frames, height, width): "
                     f"give one value, or 3{'' if grid[0] > 1 else ', or 2 for height and width'}")


def neighborhood_for(config: GNAConfig, grid: tuple[int, int, int]) -> Neighborhood:
    """The call's NA settings: explicit values, or the FLUX setting scaled to the grid."""
    scaled = not (isinstance(config.window, int) or config.window)
    if scaled:
        window = tuple(max(1, round(config.window_fraction * g)) for g in grid)
    else:
        window = per_axis(config.window, grid, "window")
    if isinstance(config.stride, int) or config.stride:
        stride = per_axis(config.stride, grid, "stride")
    elif scaled:
        stride = tuple(min(w, max(1, round(config.stride_fraction * g))) for w, g in zip(window, grid))
    else:
        stride = (1,) * AXES
    hood = Neighborhood(tuple(grid), tuple(window), tuple(stride), per_axis(config.dilation, grid, "dilation"),
                        tuple(bool(c) for c in per_axis(config.causal, grid, "causal")))
    hood.check()
    return hood


@torch.compiler.disable  # host-side list building: a compiled forward calls it once per new grid, then guards
@lru_cache(maxsize=PLAN_CACHE)
def _shared_plan(hood: Neighborhood, tile, block: int, image, text, granularity: str, device: str) -> NeighborhoodPlan:
    return neighborhood_plan(hood.grid, hood.window, hood.stride, hood.dilation, hood.causal, tile=tile, block=block,
                             image=image, text=text, granularity=granularity, device=torch.device(device))


def plan_for(state, config: GNAConfig, hood: Neighborhood, call: DiTCall, device) -> NeighborhoodPlan:
    """This call's plan: the module's own if it has it, else the process-wide one (built once for all layers)."""
    tile = tuple(per_axis(config.tile, hood.grid, "tile")) if config.tile else None
    key = (hood, tile, config.tile_tokens, call.image, call.text, config.granularity, str(device))
    plans = state.method_state.plans
    if key not in plans:
        plans[key] = _shared_plan(*key)
    return plans[key]


@register_method(
    "gna",
    config=GNAConfig,
    category="other",  # not "sparse": that category means the LLM block-sparse methods (selector, density knob)
    families=("dit",),
    patterns=("noncausal-self", "noncausal-cross"),
    state_cls=GNAState,
    paper="Hassani et al., Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of "
          "Light (arXiv 2504.16922); Faster Neighborhood Attention (NeurIPS 2024, arXiv 2403.04690); HaloNets "
          "(CVPR 2021)",
)
def gna_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, is_causal=False,
                  cross_attention=False, enable_gqa=False, **kwargs):
    """Neighborhood attention on the latent grid (1D/2D/3D, stride, dilation, causal per axis), text as extra KV."""
    state = module.patchattn
    config: GNAConfig = state.config
    call = dit_call(state, query, cross_attention)
    dense = dict(scaling=scaling, dropout=dropout, is_causal=is_causal, enable_gqa=enable_gqa)
    if runs_dense(config, call, "gna"):
        return dense_call(state, query, key, value, attention_mask, **dense)
    hood = neighborhood_for(config, call.grid)
    if hood.covers_everything():  # the documented dense-equivalent setting: exact, no warning
        return dense_call(state, query, key, value, attention_mask, **dense)
    if dropout:
        raise NotImplementedError("patchattn gna: attention dropout is not supported (the engine has none); "
                                  "set the model's attention dropout to 0")
    plan = plan_for(state, config, hood, call, query.device)
    state.record(density=plan.density)
    return tiled_call("gna", plan, query, key, value, attention_mask, scaling, config.backend, enable_gqa), None
