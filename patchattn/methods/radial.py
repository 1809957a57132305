"""``radial`` -- Radial Attention for video DiTs: a static O(n log n) mask whose spatial window shrinks by powers of two
with the temporal distance between frames (spatiotemporal energy decay).

Paper: Li, Li, Cai et al., Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation
(NeurIPS 2025, arXiv 2506.19852); code mit-han-lab/radial-attention.

What a call does (``patchattn/masks/radial.py`` has the definition):

- self attention (Wan ``attn1``, LTX-Video ``attn1``, PixArt ``attn1``, SD3 ``attn2``) and joint attention (FLUX,
  SD3, CogVideoX, HunyuanVideo): frames in raster order, each padded to whole blocks (any frame count and
  resolution: no multiple-of-128 rule), text in its own blocks after them; the engine reads, per query block, the key
  blocks of its frame pairs' bands, whole where the band covers them, through a partial tile at the band's edges.
  Text tokens see every token and every image query sees the text, in the same engine call (no second dense call
  and log-sum-exp merge as the paper's FlashInfer code);
- cross attention (Wan, PixArt and LTX-Video ``attn2``) stays dense;
- image models (FLUX, SD3, PixArt): the grid is one frame, and frame distance 0 is the dense central band, so radial
  is dense there unless ``dense_band = -1`` (then a frame's own tokens get the band-0 raster window
  ``decay_factor * tokens_per_frame``: a 1D window, not a disk -- ``clear`` is the 2D local window);
- the plan is built once per (grid, text layout, settings, device), shared by every layer.

Defaults (the paper's): the central band ``|i - j| <= 1`` dense, window ``tokens_per_frame / 2**floor(log2 d)``
(``decay_factor`` 1), the first 12 denoising steps dense (Wan 2.1 and HunyuanVideo, 50 steps), no dense layer (the
paper's HunyuanVideo; its Wan setting also keeps the first layer dense: ``dense_layers=[0]``).  The released code's
per-model knobs are fields: ``dense_band=0`` with ``first_frame_sink`` is its Wan mask (adjacent frames windowed,
frame 0 an attention-sink column), ``decay_factor`` its window scale (0.2 Wan, 0.95 HunyuanVideo).
``dense_band >= frames - 1`` is dense: such calls run the model's own SDPA, exactly, with no warning.

``granularity="block"`` reads every block pair that holds a visible pair whole (the released code's block mask
rounded outward, not its 60%/one-third threshold): no partial tile but those of a frame's padded keys, a higher
density (the one recorded), and the mask is then the rounded one, not the paper's token rule (design note 48).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar

import torch

from ..config import option
from ..masks.frames import FramePlan
from ..masks.radial import GRANULARITIES, RadialRule, radial_plan
from ..registry import register_method
from ..state import MethodState
from ._dit import DiTScheduleConfig, dense_call, dit_call, runs_dense, tiled_call

PLAN_CACHE = 32


@dataclass(kw_only=True)
class RadialConfig(DiTScheduleConfig):
    """Radial Attention's mask and schedule (the paper's defaults)."""

    dense_first_steps: int = option(12, "denoising steps run dense at the start (the paper: 12 of 50)", min=0)
    dense_band: int = option(1, "frame distance up to which frame pairs are dense (the paper's central band: 1; the "
                             "released Wan code: 0; -1: none, a frame's own tokens windowed too)", min=-1)
    decay_factor: float = option(1.0, "scale of the spatial window tokens_per_frame / 2**band (the paper: 1; the "
                                 "released code: 0.2 Wan, 0.95 HunyuanVideo)", min=0.0)
    first_frame_sink: bool = option(False, "every query sees frame 0 whole (the released Wan code's sink column)")
    block: int = option(64, "tokens per block of the engine (a power of two >= 16; the paper's code: 128)", min=16,
                        max=256)
    granularity: str = option("token", "'token': the rule exactly (band edges through partial tiles); 'block': "
                              "rounded outward to whole blocks, as the released code reads 128-token blocks (denser, "
                              "no partial tile but a frame's padded keys)", choices=GRANULARITIES)

    DENSE_EQUIVALENT: ClassVar[dict] = {"dense_band": 1 << 30}

    def validate(self) -> None:
        super().validate()
        if self.decay_factor <= 0:
            raise ValueError(f"{self.where('decay_factor')} must be > 0, got {self.decay_factor}")
        if self.block & (self.block - 1):
            raise ValueError(f"{self.where('block')} must be a power of two, got {self.block}")

    def rule(self, grid: tuple[int, int, int]) -> RadialRule:
        frames, height, width = grid
        return RadialRule(frames, height * width, self.dense_band, self.decay_factor, self.first_frame_sink)


@dataclass
class RadialState(MethodState):
    """Per module: the plans of the grids this module has seen, by (grid, layout, settings, device)."""

    plans: dict = field(default_factory=dict)


@torch.compiler.disable  # host-side list building: once per new grid
@lru_cache(maxsize=PLAN_CACHE)
def _shared_plan(grid, image, text, block, dense_band, decay_factor, sink, granularity, device: str) -> FramePlan:
    return radial_plan(grid, image=image, text=text, block=block, dense_band=dense_band, decay_factor=decay_factor,
                       first_frame_sink=sink, granularity=granularity, device=torch.device(device))


def plan_for(state, config: RadialConfig, call, device) -> FramePlan:
    """This call's plan: the module's own if it has it, else the process-wide one (built once for all layers)."""
    key = (tuple(call.grid), call.image, call.text, config.block, config.dense_band, config.decay_factor,
           config.first_frame_sink, config.granularity, str(device))
    plans = state.method_state.plans
    if key not in plans:
        plans[key] = _shared_plan(*key)
    return plans[key]


@register_method(
    "radial",
    config=RadialConfig,
    category="other",  # not "sparse": that category means the LLM block-sparse methods (selector, density knob)
    families=("dit",),
    patterns=("noncausal-self", "noncausal-cross"),
    state_cls=RadialState,
    paper="Li et al., Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation "
          "(NeurIPS 2025, arXiv 2506.19852)",
)
def radial_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, is_causal=False,
                     cross_attention=False, enable_gqa=False, **kwargs):
    """Radial Attention: a static mask whose spatial window halves per band of temporal distance; text dense."""
    state = module.patchattn
    config: RadialConfig = state.config
    call = dit_call(state, query, cross_attention)
    dense = dict(scaling=scaling, dropout=dropout, is_causal=is_causal, enable_gqa=enable_gqa)
    if runs_dense(config, call, "radial") or config.rule(call.grid).covers_everything():  # one frame, or dense_band past the last frame: exact dense
        return dense_call(state, query, key, value, attention_mask, **dense)
    if dropout:
        raise NotImplementedError("patchattn radial: attention dropout is not supported (the engine has none); "
                                  "set the model's attention dropout to 0")
    plan = plan_for(state, config, call, query.device)
    state.record(density=plan.density)
    return tiled_call("radial", plan, query, key, value, attention_mask, scaling, config.backend, enable_gqa), None
