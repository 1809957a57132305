"""``clear`` -- CLEAR's local attention for DiTs: each image token attends to the image tokens inside a circle of
Euclidean radius ``radius`` on the 2D latent grid, and to every text token; text tokens attend to everything.

Paper: Liu, Tan, Wang, CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up (NeurIPS 2025,
arXiv 2412.16112); code Huage001/CLEAR.  CLEAR distils a pretrained DiT into this attention (its q/k/v/out
projections fine-tuned against the dense teacher), so the method needs that recipe first: ``needs_finetune``.

What a call does (``patchattn/masks/circular.py`` has the definition):

- self attention and joint attention: each frame cut into 2D tiles (one tile = one engine block, e.g. 8x8), text in
  its own blocks; the engine reads, per query tile, the key tiles the circles of its tokens touch -- whole inside
  the circle, a partial tile on its rim -- and the text, in one call (CLEAR's FlexAttention ``BlockMask`` on the
  same rule);
- video: the circle is drawn inside each frame (``frame_window = 0``; ``frame_window = n`` also reads the same circle
  in the frames up to ``n`` away -- an extension for video DiTs, which CLEAR does not cover);
- cross attention (Wan, PixArt and LTX-Video ``attn2``) stays dense;
- the plan is built once per (grid, text layout, settings, device), shared by every layer.

Defaults: radius 16 (CLEAR's released FLUX.1-dev weights come with radius 8, 16 and 32), no dense step or layer.
Not implemented: CLEAR's optional down-sampled key/value tokens (``down_factor``, learnable weights) and its
"proportional attention" scale for resolutions past training (a high-resolution inference trick).
A radius past the grid's diagonal with ``frame_window >= frames - 1`` is dense: such calls run the model's own
SDPA, exactly, with no warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar

import torch

from ..config import option
from ..masks.circular import circular_plan, covers_everything
from ..masks.frames import FramePlan
from ..registry import register_method
from ..state import MethodState
from ._dit import DiTScheduleConfig, dense_call, dit_call, runs_dense, tiled_call

PLAN_CACHE = 32


@dataclass(kw_only=True)
class ClearConfig(DiTScheduleConfig):
    """CLEAR's circular local window (the released FLUX setting)."""

    radius: float = option(16.0, "radius of the circular window in latent tokens (strict: dy^2 + dx^2 < r^2)",
                           min=0.0)
    frame_window: int = option(0, "video: frames up to this distance also read the circle (0: the frame's own)",
                               min=0)
    block: int = option(64, "tokens per block of the engine (a power of two >= 16)", min=16, max=256)
    tile: list = option([], "tile (rows, columns) of one block; empty: as square as the block allows")

    DENSE_EQUIVALENT: ClassVar[dict] = {"radius": 1 << 30, "frame_window": 1 << 30}

    def validate(self) -> None:
        super().validate()
        if self.radius <= 0:
            raise ValueError(f"{self.where('radius')} must be > 0, got {self.radius}")
        if self.block & (self.block - 1):
            raise ValueError(f"{self.where('block')} must be a power of two, got {self.block}")
        if self.tile and (len(self.tile) != 2 or any(isinstance(t, bool) or not isinstance(t, int) or t < 1
                                                     for t in self.tile) or self.tile[0] * self.tile[1] != self.block):
            raise ValueError(f"{self.where('tile')} must be [rows, columns] with rows * columns == block "
                             f"({self.block}), got {self.tile}")


@dataclass
class ClearState(MethodState):
    """Per module: the plans of the grids this module has seen, by (grid, layout, settings, device)."""

    plans: dict = field(default_factory=dict)


@torch.compiler.disable  # host-side list building: once per new grid
@lru_cache(maxsize=PLAN_CACHE)
def _shared_plan(grid, image, text, radius, frame_window, block, tile, device: str) -> FramePlan:
    return circular_plan(grid, radius, frame_window=frame_window, image=image, text=text, block=block, tile=tile,
                         device=torch.device(device))


def plan_for(state, config: ClearConfig, call, device) -> FramePlan:
    """This call's plan: the module's own if it has it, else the process-wide one (built once for all layers)."""
    key = (tuple(call.grid), call.image, call.text, float(config.radius), config.frame_window, config.block,
           tuple(config.tile) or None, str(device))
    plans = state.method_state.plans
    if key not in plans:
        plans[key] = _shared_plan(*key)
    return plans[key]


@register_method(
    "clear",
    config=ClearConfig,
    category="other",  # not "sparse": that category means the LLM block-sparse methods (selector, density knob)
    families=("dit",),
    needs_finetune=True,
    patterns=("noncausal-self", "noncausal-cross"),
    state_cls=ClearState,
    paper="Liu, Tan, Wang, CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up (NeurIPS 2025, "
          "arXiv 2412.16112)",
)
def clear_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, is_causal=False,
                    cross_attention=False, enable_gqa=False, **kwargs):
    """CLEAR: a circular local window on the latent grid per frame, text tokens global (needs its distillation)."""
    state = module.patchattn
    config: ClearConfig = state.config
    call = dit_call(state, query, cross_attention)
    dense = dict(scaling=scaling, dropout=dropout, is_causal=is_causal, enable_gqa=enable_gqa)
    if runs_dense(config, call, "clear") or covers_everything(call.grid, config.radius, config.frame_window):  # the dense-equivalent setting: exact
        return dense_call(state, query, key, value, attention_mask, **dense)
    if dropout:
        raise NotImplementedError("patchattn clear: attention dropout is not supported (the engine has none); "
                                  "set the model's attention dropout to 0")
    plan = plan_for(state, config, call, query.device)
    state.record(density=plan.density)
    return tiled_call("clear", plan, query, key, value, attention_mask, scaling, config.backend, enable_gqa), None
