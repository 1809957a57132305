"""What every DiT method shares: the schedule fields, the typed view of one call, and the exact dense call.

A DiT method sees one attention call of one module at one denoising step.  The diffusers adapter
(``adapters/diffusers.py``) fills ``PatchContext`` from the transformer's input before each forward -- the latent grid,
the text span, the timestep and the denoising step it counts -- and sets ``context.layout`` for the calling module's
role; ``dit_call`` turns that into a ``DiTCall``.  Methods never read ``context.extras`` themselves.

Schedules are config fields of every DiT method (``DiTScheduleConfig``): dense attention for the first and the last
denoising steps (Radial Attention's warm-up; the last steps after radial-attention issue #51) and for chosen layers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import MethodConfig, option
from ..kernels.blocksparse import block_sparse_attention


@dataclass(kw_only=True)
class DiTScheduleConfig(MethodConfig):
    """Schedule fields shared by every DiT method: where the method steps aside for dense attention."""

    dense_first_steps: int = option(0, "denoising steps run dense at the start (warm-up)", min=0)
    dense_last_steps: int = option(
        0, "denoising steps run dense at the end (needs the step count: a patched pipeline, or set_denoising_steps)",
        min=0,
    )
    dense_layers: list = option([], "attention modules (adapter order) that stay dense", min=0, index="layer")

    SCHEDULE_FIELDS: ClassVar[tuple[str, ...]] = ("dense_first_steps", "dense_last_steps", "dense_layers")


@dataclass(frozen=True)
class DiTCall:
    """One DiT attention call, as a method needs to know it.

    Attributes:
        role: ``"joint"`` (text and image tokens in one sequence), ``"self"`` (image/video only) or ``"cross"``
            (image/video queries, text keys).
        grid: latent grid ``(frames, height, width)`` in tokens, or None when the adapter could not read it.
        image: ``(start, stop)`` of the image/video tokens in the query sequence.
        text: ``(start, stop)`` ranges of text tokens in the query sequence (joint attention only).
        layer: index of the attention module (adapter order: ``named_modules`` of the transformer).
        step: denoising step counted by the adapter (0 at the first forward of a generation), None when unknown.
        num_steps: the generation's number of steps when known (a patched pipeline's scheduler), else None.
        timestep: the transformer's ``timestep`` input of this forward (a tensor), or None.
    """

    role: str
    grid: tuple[int, int, int] | None
    image: tuple[int, int]
    text: tuple[tuple[int, int], ...]
    layer: int
    step: int | None
    num_steps: int | None
    timestep: torch.Tensor | None

    @property
    def n_image(self) -> int:
        return self.image[1] - self.image[0]

    @property
    def n_text(self) -> int:
        return sum(stop - start for start, stop in self.text)


def dit_call(state, query: torch.Tensor, cross_attention: bool = False) -> DiTCall:
    """The ``DiTCall`` of this module's current call (``query [B, H, T, D]``)."""
    context = state.context
    layout = context.layout
    extras = context.extras
    n_query = query.shape[2]
    image = layout.image_slice if layout.image_slice is not None else (0, n_query)
    if cross_attention:
        role = "cross"
    else:
        role = "joint" if layout.text_slices else "self"
    return DiTCall(
        role=role, grid=layout.grid, image=tuple(image), text=tuple(layout.text_slices), layer=state.layer_index,
        step=extras.get("step"), num_steps=extras.get("num_steps"), timestep=extras.get("timestep"),
    )


def scheduled_dense(config: DiTScheduleConfig, call: DiTCall) -> bool:
    """True when the schedule runs this call dense (a dense layer, or a warm-up / final step).

    ``dense_last_steps`` needs the step count; without it (a bare transformer, no ``set_denoising_steps``) the
    field cannot be honoured: it warns (once per place, Python's default) and the step runs the method.
    """
    if call.layer in config.dense_layers:
        return True
    if call.step is None:
        return False
    if call.step < config.dense_first_steps:
        return True
    if config.dense_last_steps:
        if call.num_steps is None:
            warnings.warn("dense_last_steps is set but the number of denoising steps is unknown (patch the pipeline, or "
                          "call patchattn.set_denoising_steps(model, n)); the last steps run the method", stacklevel=2)
            return False
        return call.step >= call.num_steps - config.dense_last_steps
    return False


def runs_dense(config: DiTScheduleConfig, call: DiTCall, method: str) -> bool:
    """True when this call runs the model's dense attention: cross attention (no grid to act on), a scheduled dense
    step or layer, or an unknown latent grid (warned: never a silent fallback)."""
    if call.role == "cross" or scheduled_dense(config, call):
        return True
    if call.grid is None:
        warnings.warn(f"patchattn {method}: the latent grid of this call is unknown; it runs dense attention",
                      stacklevel=3)
        return True
    return False


def dense_call(state, query, key, value, attention_mask, *, scaling=None, dropout=0.0, is_causal=False,
               enable_gqa=False):
    """The model's own SDPA call as a method's result (``(out [B, T, H, D], None)``), recorded as density 1."""
    state.record(density=1.0)
    return dense_sdpa(query, key, value, attention_mask, scaling=scaling, dropout=dropout, is_causal=is_causal,
                      enable_gqa=enable_gqa), None


def dense_sdpa(query, key, value, attn_mask=None, *, scaling=None, dropout=0.0, is_causal=False, enable_gqa=False):
    """The exact SDPA call the unpatched model makes, returned ``[B, T, H, D]`` as methods return."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout,
                                         is_causal=is_causal, scale=scaling, enable_gqa=enable_gqa)
    return out.transpose(1, 2)


def key_padding_ends(attn_mask: torch.Tensor | None, batch: int, k_len: int) -> torch.Tensor | None:
    """Each row's number of visible keys, for a key-padding mask whose visible keys are a prefix (HunyuanVideo's
    ``[video; text; padding]``); None when there is no mask.

    ``attn_mask`` is SDPA's: bool (True = visible) or additive float (0 visible, <= -1e4 hidden), broadcasting over
    heads and queries (``[B or 1, 1, 1, Tk]``).  Anything else is not a key-padding mask: NotImplementedError, so a
    sparse method never drops a mask silently.  The prefix check reads the mask on the host (skipped under
    ``torch.compile``, where it would break the graph).
    """
    if attn_mask is None:
        return None
    if attn_mask.ndim != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1:
        raise NotImplementedError(
            f"this DiT method supports key-padding masks [B, 1, 1, Tk] only, got a mask of shape "
            f"{tuple(attn_mask.shape)}"
        )
    visible = attn_mask if attn_mask.dtype == torch.bool else attn_mask > -1e4
    visible = visible[:, 0, 0].expand(batch, k_len)
    ends = visible.sum(-1, dtype=torch.int32)
    if not torch.compiler.is_compiling():
        prefix = torch.arange(k_len, device=visible.device)[None] < ends[:, None]
        hidden_values_ok = attn_mask.dtype == torch.bool or bool(((attn_mask == 0) | (attn_mask <= -1e4)).all())
        if not (hidden_values_ok and torch.equal(prefix, visible)):
            raise NotImplementedError(
                "this DiT method supports key-padding masks whose visible keys are a prefix of the sequence "
                "(0 / -inf or bool), not this mask"
            )
    return ends


def key_bias_in_order(attention_mask, heads: int, length: int, position: torch.Tensor):
    """A mask that depends on the key only (``[B|1, H|1, 1, T]``: padded text of a varlen batch) as the engine's
    per-key additive bias in a permuted order (``position[i]``: where token ``i`` goes in a sequence of ``length``;
    slots no token fills get 0: grid padding is hidden by the tiles), ``[B|1, H|1, length]`` fp32; None for any
    other mask (one that depends on the query too)."""
    if attention_mask.dim() != 4 or attention_mask.shape[2] != 1 or attention_mask.shape[1] not in (1, heads):
        return None
    columns = attention_mask[:, :, 0, :]
    if columns.dtype == torch.bool:
        bias = torch.zeros(columns.shape, dtype=torch.float32, device=columns.device)
        bias = bias.masked_fill(~columns, float("-inf"))
    else:
        bias = columns.float()
    out = bias.new_zeros(bias.shape[0], bias.shape[1], length)
    return out.index_copy(2, position, bias)


def tiled_call(name: str, plan, query, key, value, attention_mask, scaling, backend: str, enable_gqa: bool):
    """One block-sparse engine call over a DiT method's token plan (``permute``/``unpermute``, ``tiled``,
    ``position``, ``length``: gna's ``NeighborhoodPlan``, radial's and clear's ``FramePlan``), ``query [B, H, T, D]``
    -> ``[B, T, H, D]``.  A key-padding mask (HunyuanVideo's padded text) becomes the engine's per-key bias; a mask
    that depends on the query runs dense SDPA under the plan's token mask, with a warning."""
    bias = None
    if attention_mask is not None:
        bias = key_bias_in_order(attention_mask, query.shape[1], plan.length, plan.position)
        if bias is None:
            return _masked_dense(name, plan, query, key, value, attention_mask, scaling, enable_gqa)
    tiled = plan.tiled
    if tiled.kv_indices.device != query.device:
        tiled = tiled.to(query.device)
    q, k, v = plan.permute(query), plan.permute(key), plan.permute(value)
    out = block_sparse_attention(q, k, v, tiled.kv_indices, tiled.kv_counts, block_q=tiled.block_q,
                                 block_k=tiled.block_k, causal=False, scale=scaling, col_bias=bias,
                                 tile_masks=tiled.tile_masks, tile_mask_ids=tiled.tile_mask_ids, backend=backend)
    return plan.unpermute(out).transpose(1, 2)


def _masked_dense(name: str, plan, query, key, value, attention_mask, scaling, enable_gqa):
    """A mask over queries and keys (no supported family passes one): dense SDPA over it and the plan's token mask
    (``T x T``, slow), never the mask dropped."""
    warnings.warn(f"patchattn {name}: this self/joint attention call has an attn_mask that depends on the query; it "
                  "runs as dense SDPA with the method's mask (T x T) added, not through the block-sparse engine",
                  stacklevel=3)
    allowed = plan.token_mask().to(query.device)
    if attention_mask.dtype == torch.bool:
        mask = attention_mask & allowed
    else:
        mask = attention_mask.masked_fill(~allowed, float("-inf"))
    return dense_sdpa(query, key, value, mask, scaling=scaling, enable_gqa=enable_gqa)
