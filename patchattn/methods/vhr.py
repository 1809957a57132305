"""``vhr`` — Vision-aware Head Reinforcement: scale the heads whose output depends most on the image.

He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence" (ACL 2025),
arXiv 2412.13949 (paper text; the official code was not available to us).

At the first generated token (the prefill's last query row), in every patched layer:

1. **Head outputs with and without the image.**  ``A_h`` = head ``h``'s output ``softmax(q K^T) V`` for the last
   row; ``A_h^-`` = the same row with the image keys removed (``methods/_lastrow``: an exact ``O(Tk)`` row on the
   call's own K/V, never a ``T x T`` matrix).
2. **VHD** ``= ||A_h - A_h^-||_2``; ``TA = ||A_h^-||^2``.
3. **Outliers** (heads that surge when the image is removed): ``VHD_h = 0`` where both ``VHD_h > mean + std`` and
   ``TA_h > mean(TA) + std(TA)`` (over the layer's heads; population std).
4. **Selection**: heads with ``VHD_h > median`` (the mean of the two middle values for an even head count).
5. **Reinforcement**: the selected heads' outputs times ``alpha`` (2), before ``o_proj``.

Layers run in order, so layer ``l`` selects after the layers before it were reinforced (the paper's layer-by-layer
select-then-reinforce).  The heads are chosen per sequence (per row of a batch) and kept in
``module.patchattn.method_state.heads`` for every later call (decode steps), as the paper fixes them at ``t = 0``.

**Deviation.**  The paper's no-image branch is a second forward of the prompt without the image (run in lockstep
as a batch of two); here it is the *same* call's last row with the image keys removed, so the text tokens' keys
and values still carry what they read from the image in earlier layers, and positions are the with-image ones.  One
forward instead of two; documented in docs/design-notes.md (note 34).

**Layers** (``last_layers``, ``layers``): the paper's best setting for LLaVA-1.5 is the last 14 layers (its text also
names "the second" layer; read as the last 14, see the notes).  ``rows``: ``"all"`` scales every row of the calls
(equivalent to scaling the head's slice of ``W_O``, the paper's hook), ``"generated"`` only the prefill's last row
and the decode steps.  ``alpha = 1`` is dense exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import MethodConfig, option
from ..registry import register_method
from ..state import MethodState, PatchState
from ._heads import dense_call, head_counts
from ._lastrow import last_row, row_output
from ._perforward import has_image, per_forward

ROWS = ("all", "generated")
NOT_ADOPTED = ("patchattn {method}: this model was loaded with attn_implementation='patchattn_{method}', so nothing "
               "tells the attention which tokens are image tokens and it runs dense; call patchattn.get_handle(model) "
               "(or patchattn.patch) once after loading")


@dataclass(kw_only=True)
class VHRConfig(MethodConfig):
    alpha: float = option(2.0, "gain of the selected (vision-aware) heads (paper: 2)", min=0.0)
    last_layers: int = option(14, "reinforce the last this many layers of the language model (paper, LLaVA-1.5: 14)",
                              min=0)
    layers: list = option([], "explicit layer indices to reinforce (replaces last_layers when given)",  # noqa: RUF009
                          min=0, index="layer")
    rows: str = option("all", "rows whose selected heads are scaled: 'all' (every token, as scaling W_O) or "
                       "'generated' (the prefill's last row and the decode steps)", choices=ROWS)

    DENSE_EQUIVALENT: ClassVar[dict] = {"alpha": 1.0}


@dataclass
class VHRState(MethodState):
    """Whether the layer reinforces at all (fixed when patching), and the heads the latest prefill chose:
    bool ``[B, Hq]`` per sequence, with their divergences ``vhd`` ``[B, Hq]`` (after outlier removal)."""

    active: bool = False
    heads: torch.Tensor | None = None
    vhd: torch.Tensor | None = None


def reinforced_layers(config: VHRConfig, num_layers: int) -> set[int]:
    if config.layers:
        return set(config.layers)
    return set(range(max(0, num_layers - config.last_layers), num_layers))


def make_vhr_state(module, config: VHRConfig, layer_index, role, context) -> PatchState:
    if role != "text":  # the method edits the language model only
        return PatchState(config, layer_index, role, context, VHRState())
    head_counts(module)  # a clear error without a model config
    active = layer_index in reinforced_layers(config, module.config.num_hidden_layers)
    return PatchState(config, layer_index, role, context, VHRState(active=active))


def image_columns(context, batch: int, kv_len: int, device) -> torch.Tensor | None:
    """bool ``[B, 1, Tk]``: the image tokens among the call's keys (the prefill's mask, padded with text for the keys
    generated since; built once per forward); None when the input had no image or another batch."""
    mask = context.layout.image_token_mask
    if mask is None or mask.shape[0] != batch or mask.shape[1] > kv_len:
        return None

    def columns():
        padded = mask.to(device)
        if padded.shape[1] < kv_len:
            padded = torch.cat([padded, padded.new_zeros(batch, kv_len - padded.shape[1])], dim=1)
        return padded[:, None, :]

    return per_forward(context, "vhr_image_columns", (mask, kv_len, device), columns)


def head_divergence(with_image: torch.Tensor, without_image: torch.Tensor) -> torch.Tensor:
    """VHD ``[B, H]`` from the last row's head outputs ``[B, H, D]``, with the paper's outliers set to 0."""
    vhd = (with_image - without_image).norm(dim=-1)
    text_only = without_image.pow(2).sum(-1)

    def above_mean_std(x):
        std, mean = torch.std_mean(x, -1, correction=0, keepdim=True)
        return x > mean + std

    return vhd.masked_fill(above_mean_std(vhd) & above_mean_std(text_only), 0.0)


def select_heads(vhd: torch.Tensor) -> torch.Tensor:
    """bool ``[B, H]``: heads above their layer's median VHD (a row whose VHD is all 0, no image, selects none).

    The median is ``quantile(0.5)``'s (the mean of the two middle values for an even head count, interpolated as
    it does) from one sort: quantile's general path queues about three times the ops, in every layer."""
    heads = vhd.shape[-1]
    ordered = vhd.sort(-1).values
    median = torch.lerp(ordered[..., (heads - 1) // 2], ordered[..., heads // 2], 0.5)
    return vhd > median[..., None]


def choose_heads(query, key, value, attention_mask, image, *, scaling, softcap=None, context=None):
    """(heads bool ``[B, Hq]``, VHD ``[B, Hq]``) of one prefill call: its last row with and without the image keys
    (``image`` bool ``[B, 1, Tk]``; ``context``: share the row's mask between layers)."""
    image = image[:, None, :] if image.dim() == 2 else image
    row = last_row(query, key, value, attention_mask, scaling=scaling, softcap=softcap, context=context)
    with_image = row_output(row)
    without_image = row_output(row, row.logits.masked_fill(image, float("-inf")))
    vhd = head_divergence(with_image, without_image)
    return select_heads(vhd), vhd


@register_method(
    "vhr",
    config=VHRConfig,
    category="head",
    families=("lvlm",),
    patterns=("causal-self",),
    make_state=make_vhr_state,
    state_cls=VHRState,
    paper="He et al., Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence (ACL 2025), "
    "arXiv 2412.13949",
)
def vhr_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """Vision-aware head reinforcement: heads whose output changes most without the image, times alpha."""
    state = module.patchattn
    config, kept = state.config, state.method_state
    out, _ = dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    state.record(density=1.0)
    if not kept.active or config.alpha == 1.0:
        return out, None
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    if q_len == kv_len:  # a sequence's first call: its last row gives the first generated token
        if not state.context.kind:  # a state made lazily by a call: no adapter hook marks the image tokens
            warnings.warn(NOT_ADOPTED.format(method="vhr"), stacklevel=2)
        image = image_columns(state.context, batch, kv_len, query.device)
        if image is None or not has_image(state.context, state.context.layout.image_token_mask):
            kept.heads = kept.vhd = None
            return out, None
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        kept.heads, kept.vhd = choose_heads(query, key, value, attention_mask, image, scaling=scale,
                                            softcap=kwargs.get("softcap"), context=state.context)
        state.record(heads_per_row=lambda heads=kept.heads: heads.sum(-1).float().mean())  # computed when read
    heads = kept.heads
    if heads is None or heads.shape != (batch, query.shape[1]):
        return out, None
    selected = heads.to(out.device)[:, None, :, None]
    if config.rows == "generated" and q_len > 1:
        out = out.clone()
        out[:, -1:] = torch.where(selected, out[:, -1:] * config.alpha, out[:, -1:])
        return out, None
    return torch.where(selected, out * config.alpha, out), None  # no gain tensor: two kernels, not five ops


# ---- eager oracle ----------------------------------------------------------------------------------------------
def vhr_reference(q, k, v, image, *, alpha, scale=None, allowed=None, heads=None):
    """The paper's computation on materialised probabilities (tests, tiny inputs): ``(out [B, Hq, Tq, D], heads)``.

    q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]``; ``image`` bool ``[B, Tk]``; ``allowed`` bool ``[B, 1, Tq, Tk]``
    (None: causal).  The no-image branch renormalises the last row's probabilities without the image columns;
    ``heads`` (bool ``[B, Hq]``) given: a later call reusing a choice, else chosen here from the last row."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_len, kv_len = q.shape[2], k.shape[2]
    if allowed is None:
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)[None, None]
    probs = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    out = probs @ v
    if heads is None:
        last = probs[:, :, -1]
        kept = last * ~image[:, None, :]
        seen = (last * image[:, None, :]).sum(-1, keepdim=True) > 0
        without = torch.where(seen, kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(kept.dtype).tiny), last)
        heads = select_heads(head_divergence(out[:, :, -1], without.unsqueeze(2).matmul(v)[:, :, 0]))
    return out * torch.where(heads, alpha, 1.0).to(out.dtype)[:, :, None, None], heads
