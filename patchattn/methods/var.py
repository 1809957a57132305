"""``var`` — Visual Attention Redistribution: recycle the attention an LVLM's image-centric heads spend on sink tokens.

Kang, Kim, Kim, Hwang, "See What You Are Told: Visual Attention Sink in Large Multimodal Models" (ICLR 2025),
arXiv 2503.03321; follows the released code (VisAttnSink, ``src/logic/logic.py``) where the paper is silent.

1. **Sink tokens** (per layer, per sequence, at prefill).  At the *input* of decoder layer l (the residual stream,
   before the layer's norm) a token is a sink when ``max_{d in D_sink} |x_d / rms(x)| > tau`` (weightless RMS
   normalisation; ``D_sink`` the backbone's massive-activation dimensions, data in ``calibrate/plans/sink_dims.json``
   found by ``patchattn calibrate sink-dims``).  Sinks among the image tokens are *visual sinks*, the others *text
   sinks* (BOS, ...).  The hidden state comes from a forward pre-hook on each patched decoder layer, installed with
   ``register_method(..., install=)`` (the attention call never sees the layer input; the hook writes the token
   flags into the layer's ``VARState`` just before its attention runs).
2. **Image-centric (head, query) rows.**  With ``A`` the row's attention, ``I`` the image tokens and ``I_ns`` the
   non-sink ones: the row is image-centric when ``A(I) >= summ`` and ``A(I_ns) / A(I) >= rho`` (the code's "sink
   share of the image attention <= 0.5"), and the sequence has a visual sink at this layer.  Rows: the text queries
   after the first image token at prefill, the new token when decoding.
3. **Redistribution** on those rows: every sink column (text and visual; ``budget="visual"``: visual only) gives up
   ``p`` of its weight, and the freed mass ``F = p * A(S)`` goes to ``I_ns`` in proportion to their weights.  Row
   sums stay 1; text non-sink tokens are untouched.

**How it runs on the fused kernels (no T x T matrix).**  ``O' = O + F * Obar(I_ns) - p * sum_{j in S} A_j v_j``, with
``Obar(I_ns)`` the attention output restricted to ``I_ns`` (normalised there).  One pass of ``kernels/colclass``
over each edited row's causal keys gives every term: each key carries a class code (bit 0 ``I_ns``, bit 1 the giving
sinks, bit 2 the visual sinks, built once per layer at prefill), and one online softmax keeps the row's sums over
all keys and over each class plus ``sum p_j v_j`` over ``I_ns`` and over the givers, so ``A(I_ns)``, ``A(S)``,
``A(I_s)``, ``Obar(I_ns)`` and ``sum_S A_j v_j`` come from one launch.  ``O`` is the model's own attention (SDPA
with its mask): rows that are not edited are bit for bit the unpatched model.  ``var_reference`` is the eager
oracle.

**Decoding.**  The image mask (the adapter's ``context.layout``) and each layer's sink set are frozen at prefill (a
call whose queries are all its keys) in ``VARState``; decode steps reuse them (tokens generated later are neither
image nor sink tokens), and only the new row's ratios are computed.  Sliding-window and soft-capped layers (Gemma)
run unchanged.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..artifacts import PLANS_DIR
from ..config import MethodConfig, option
from ..kernels.colclass import class_attention
from ..registry import register_method
from ..state import MethodState, PatchState, get_state
from ._heads import dense_call, head_counts, use_fused_kernel
from ._perforward import has_image, per_forward

AUTO = "auto"
TABLE_KEY = "sink_dims"
SHIPPED_TABLE = PLANS_DIR / "sink_dims.json"
MATCH_FIELDS = ("hidden_size", "num_hidden_layers", "intermediate_size")  # which backbone an entry is
HOW_TO = ("find them with `patchattn calibrate sink-dims --model <folder> --out sink_dims.json`, then "
          "sink_dims='sink_dims.json' (or give the dimensions: sink_dims=[d1, d2])")


@dataclass(kw_only=True)
class VARConfig(MethodConfig):
    p: float = option(0.6, "fraction of each sink's attention recycled to the image's non-sink tokens (the paper's "
                      "p; with p_kept the fraction kept, as the released code reads it)", min=0.0, max=1.0)
    p_kept: bool = option(False, "read p as the fraction the sinks KEEP (released code: keeps 0.6, recycles 0.4)")
    tau: float = option(20.0, "sink threshold on max over D_sink of |x_d / rms(x)| of a layer's input (paper: 20)",
                        min=0.0)
    rho: float = option(0.5, "image-centric: non-sink share of the row's image attention at least rho (code: 0.5)",
                        min=0.0, max=1.0)
    summ: float = option(0.2, "image-centric: the row's total image attention at least summ (code: 0.2)",
                         min=0.0, max=1.0)
    sink_dims: str | list = option(  # noqa: RUF009
        AUTO, "massive-activation dimensions D_sink: 'auto' (the shipped table, by backbone), a JSON table path "
        "(written by `patchattn calibrate sink-dims`), or a list of ints")
    first_layer: int = option(2, "sinks are detected, and attention redistributed, from this decoder layer on "
                              "(paper: 2)", min=0)
    except_last_layer: bool = option(True, "leave the last decoder layer unchanged (paper: yes)")
    budget: str = option("all", "which sinks give up attention: 'all' (text and visual sinks, released code) or "
                         "'visual' (visual sinks only)", choices=("all", "visual"))

    DENSE_EQUIVALENT: ClassVar[dict] = {"p": 0.0}

    @property
    def recycled(self) -> float:
        """The fraction of each sink's weight that moves (``p``, or ``1 - p`` with ``p_kept``)."""
        return 1.0 - self.p if self.p_kept else self.p

    def validate(self) -> None:
        if isinstance(self.sink_dims, list):
            check_dims(self.where("sink_dims"), self.sink_dims)
        elif self.sink_dims != AUTO:
            sink_dims_table(self.sink_dims)


@dataclass
class VARState(MethodState):
    """One decoder layer's VAR state.

    ``dims`` long ``[k]``: D_sink (follows the module's device); ``active``: this layer detects sinks and edits rows;
    ``hidden_sinks`` bool ``[B, T]``: the sink flags of the latest layer input (the pre-hook's); ``sinks`` / ``image``
    bool ``[B, T0]``: the prefill's sink tokens and image tokens, frozen for the calls that follow; ``classes`` int8
    ``[B, T0]``: their class codes for the fused pass (``class_codes``)."""

    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ("dims",)

    dims: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    active: bool = False
    hidden_sinks: torch.Tensor | None = None
    sinks: torch.Tensor | None = None
    image: torch.Tensor | None = None
    classes: torch.Tensor | None = None


# ---- D_sink as data ----------------------------------------------------------------------------------------------
def check_dims(where: str, dims, hidden_size: int | None = None) -> list[int]:
    bound = f"[0, {hidden_size - 1}]" if hidden_size else ">= 0"
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0 or (hidden_size and d >= hidden_size):
            raise ValueError(f"{where}: sink dimension {d!r} is not allowed; dimensions are ints in {bound}")
    return sorted(set(dims))


@functools.lru_cache(maxsize=16)
def _read_table(path: str, _mtime_ns: int) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the sink-dimension table is JSON") from err
    table = data.get(TABLE_KEY) if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise TypeError(f"{path}: a sink-dimension table is a JSON object with a {TABLE_KEY!r} object "
                         "{model_type: [{hidden_size, num_hidden_layers, intermediate_size, dims, ...}]}")
    for model_type, entries in table.items():
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "dims" in e for e in entries):
            raise ValueError(f"{path}: {TABLE_KEY}[{model_type!r}] must be a list of entries with 'dims'")
        for e in entries:
            check_dims(f"{path}: {TABLE_KEY}[{model_type!r}]", e["dims"])
    return data


def sink_dims_table(name_or_path: str | Path = SHIPPED_TABLE) -> dict:
    """A sink-dimension table (``{"sink_dims": {model_type: [entry, ...]}}``), checked; ValueError when missing."""
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"no sink-dimension table at {str(name_or_path)!r} (a JSON file; the shipped one is "
                         f"{SHIPPED_TABLE.name}); {HOW_TO}")
    return _read_table(str(path), path.stat().st_mtime_ns)


def lookup_sink_dims(table: dict, text_config) -> list[int] | None:
    """D_sink of the first entry for this backbone (model type, then every ``MATCH_FIELDS`` the entry names)."""
    for entry in table[TABLE_KEY].get(getattr(text_config, "model_type", None), []):
        if all(entry.get(f) is None or entry[f] == getattr(text_config, f, None) for f in MATCH_FIELDS):
            return list(entry["dims"])
    return None


def resolve_sink_dims(config: VARConfig, text_config) -> list[int]:
    """The layer's D_sink; empty (nothing is redistributed, with a warning) when the table has no entry."""
    hidden = getattr(text_config, "hidden_size", None)
    if isinstance(config.sink_dims, list):
        return check_dims(config.where("sink_dims"), config.sink_dims, hidden)
    table = sink_dims_table(SHIPPED_TABLE if config.sink_dims == AUTO else config.sink_dims)
    dims = lookup_sink_dims(table, text_config)
    if dims is None:
        warnings.warn(f"patchattn var: no sink dimensions for this {getattr(text_config, 'model_type', '?')} backbone "
                      f"(hidden_size {hidden}), so nothing is redistributed; {HOW_TO}", stacklevel=3)
        return []
    return check_dims(config.where("sink_dims"), dims, hidden)


def make_var_state(module, config: VARConfig, layer_index, role, context) -> PatchState:
    head_counts(module)  # a clear error without a model config
    text_config = module.config
    layers = text_config.num_hidden_layers
    dims = resolve_sink_dims(config, text_config) if role == "text" else []
    edits = config.first_layer <= layer_index and not (config.except_last_layer and layer_index == layers - 1)
    state = VARState(dims=torch.tensor(dims, dtype=torch.long), active=bool(dims) and edits and role == "text")
    return PatchState(config, layer_index, role, context, state)


# ---- sink tokens from the layer input ----------------------------------------------------------------------------
def massive_tokens(hidden: torch.Tensor, dims: torch.Tensor, tau: float, eps: float = 1e-6) -> torch.Tensor:
    """bool ``[B, T]``: tokens whose weightless-RMS-normalised hidden state exceeds ``tau`` in a sink dimension."""
    # The RMS in fp32 without an fp32 copy of the hidden states; only the few sink dimensions are upcast.
    mean_square = torch.linalg.vector_norm(hidden, dim=-1, keepdim=True, dtype=torch.float32).pow(2) / hidden.shape[-1]
    picked = hidden.index_select(-1, dims.to(hidden.device)).float()
    return (picked * torch.rsqrt(mean_square + eps)).abs().amax(-1) > tau


@dataclass
class SinkProbe:
    """Forward pre-hook of a decoder layer: flags the sink tokens of its input for its attention's ``VARState``.

    A class rather than a closure, so a patched model can be deep-copied and pickled."""

    state: PatchState

    def __call__(self, _module, args, kwargs):
        kept = self.state.method_state
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if kept.active and torch.is_tensor(hidden) and hidden.ndim == 3:
            kept.hidden_sinks = massive_tokens(hidden, kept.dims, self.state.config.tau)


def install_sink_probes(model, patch) -> list:
    """One ``SinkProbe`` on the decoder layer (the attention module's parent) of every active text layer."""
    handles = []
    for name in patch.modules:
        module = model.get_submodule(name)
        state = get_state(module)
        if state is None or not state.method_state.active or "." not in name:
            continue
        layer = model.get_submodule(name.rsplit(".", 1)[0])
        handles.append(layer.register_forward_pre_hook(SinkProbe(state), with_kwargs=True))
    return handles


# ---- the fused edit ----------------------------------------------------------------------------------------------
def key_starts(attention_mask, batch: int, kv_len: int) -> torch.Tensor | None:
    """``[B]`` int32 first key the newest query sees (left padding; 0 without), or None without a mask.  Read from the
    mask's last row, which is a text row in every family (Gemma 3's bidirectional image block does not reach it).
    Always a tensor when there is a mask: asking whether any row is padded would be a host read in every layer."""
    if attention_mask is None:
        return None
    visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    last = visible[:, 0, -1, :kv_len] if visible.ndim == 4 else visible.reshape(visible.shape[0], -1)[:, -kv_len:]
    return last.int().argmax(-1).expand(batch).int()


# Class codes of the one fused pass (``kernels/colclass``): bit 0 the image's non-sink tokens, bit 1 the sinks that
# give up attention, bit 2 the visual sinks.
NON_SINK_IMAGE, GIVER, VISUAL_SINK = 1, 2, 4


def class_codes(image: torch.Tensor, sinks: torch.Tensor, budget: str) -> torch.Tensor:
    """int8 ``[B, Tk]`` class code of each key from the image and sink masks (bool ``[B, Tk]``).  Padding keys need
    no care: the kernel never sees a key before ``kv_start``, and image tokens are never padding."""
    image, sinks = image.to(torch.int8), sinks.to(torch.int8)
    visual = image * sinks
    givers = sinks if budget == "all" else visual
    return (image - visual).add_(givers, alpha=GIVER).add_(visual, alpha=VISUAL_SINK)  # few ops: once per layer


def redistribute(q, k, v, image, sinks, rows, *, recycled, rho, summ, budget, scale, starts, backend, classes=None):
    """The VAR edit as a correction of the dense output: ``(correction [B, Hq, Tq, D], selected bool [B, Hq, Tq])``.

    q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]`` (queries are the last Tq keys); ``image`` / ``sinks`` bool
    ``[B, Tk]``; ``rows`` bool ``[B, Tq]``: the query rows that may be edited.  Edited output = dense + correction on
    the selected (head, query) rows, and exactly 0 on the others.  ``classes``: ``class_codes(image, sinks,
    budget)`` when the caller keeps it.
    One pass over each row's causal keys gives ``A(I_ns)``, ``A(S)``, ``A(I_s)``, ``Obar(I_ns)`` and
    ``sum_S A_j v_j`` (``class_attention``).
    """
    if classes is None:
        classes = class_codes(image, sinks, budget)
    mass, image_out, given_out = class_attention(q, k, v, classes, scale=scale, kv_start=starts, backend=backend)
    mass_image_ns, mass_given, mass_visual_sinks = mass.unbind(-1)
    visual = (classes >= VISUAL_SINK).any(-1)  # bit 2 is the top bit: the sequence has a visual sink
    mass_image = mass_image_ns + mass_visual_sinks
    # A row that sees no key has every mass 0, so the last term leaves it out.
    selected = (rows[:, None, :] & visual[:, None, None] & (mass_image >= summ)
                & (mass_image_ns >= rho * mass_image) & (mass_image_ns > 0))
    gain = recycled * selected  # p on the selected rows, 0 elsewhere: the correction is 0 there
    # p * (A(S) * Obar(I_ns) - sum_S A_j v_j), in place on the pass's own fresh outputs
    correction = image_out.mul_(mass_given[..., None]).sub_(given_out).mul_(gain[..., None])
    return correction, selected


def editable_rows(image: torch.Tensor, q_len: int, starts) -> torch.Tensor:
    """bool ``[B, Tq]``: query rows VAR may edit: text tokens after the first image token (decode steps: the new
    tokens), not padding.  ``image`` bool ``[B, Tk]`` (the frozen prefill mask, extended with False)."""
    kv_len = image.shape[1]
    positions = torch.arange(kv_len - q_len, kv_len, device=image.device)
    first_image = torch.where(image.any(-1), image.int().argmax(-1), kv_len)  # [B]
    rows = (positions[None] > first_image[:, None]) & ~image[:, kv_len - q_len:]
    if starts is not None:
        rows &= positions[None] >= starts.to(image.device).long()[:, None]
    return rows


def _frozen(context, kept: VARState, batch: int, kv_len: int, device):
    """The prefill's image and sink masks and this layer's class codes, extended (False / 0) to ``kv_len`` keys, or
    None when they do not fit.  A prefill uses them as they are; a decode step pads the image once per forward."""
    if kept.classes is None or kept.image.shape[0] != batch or kept.image.shape[1] > kv_len:
        return None
    extra = kv_len - kept.image.shape[1]
    if extra == 0:
        return kept.image.to(device), kept.sinks.to(device), kept.classes.to(device)
    grow = lambda mask: torch.nn.functional.pad(mask.to(device), (0, extra))
    image = per_forward(context, "var_image", (kept.image, kv_len, device), lambda: grow(kept.image))
    return image, grow(kept.sinks), grow(kept.classes)


def _freeze(state: PatchState, batch: int, kv_len: int) -> None:
    """At prefill: keep this sequence's image mask (the adapter's), this layer's sink flags (the pre-hook's) and the
    class codes of the fused pass built from them (one small build per layer and prefill)."""
    kept = state.method_state
    image = state.context.layout.image_token_mask
    sinks = kept.hidden_sinks
    fits = (image is not None and sinks is not None and tuple(image.shape) == (batch, kv_len)
            and tuple(sinks.shape) == (batch, kv_len) and has_image(state.context, image))
    kept.image, kept.sinks = (image.bool(), sinks.bool()) if fits else (None, None)
    kept.classes = class_codes(kept.image, kept.sinks, state.config.budget) if fits else None
    kept.hidden_sinks = None


def _rows_from(context, kept: VARState, image, attention_mask, starts, q_len: int):
    """(editable rows bool ``[B, Tq]``, the first editable row or None).  Only the rows from the first editable one
    on go through the passes: a prefill's prompt and image rows (the bulk of an LVLM prompt) cost nothing more than
    dense attention.  Where that row is, is read once per forward (the image and attention masks are the same objects
    in every layer); a decode step's one row needs no read (an unedited row is not selected)."""
    key = (kept.image, attention_mask, q_len, image.shape[1])
    if q_len == 1:
        return per_forward(context, "var_rows", key, lambda: (editable_rows(image, q_len, starts), 0))

    def first_row():
        rows = editable_rows(image, q_len, starts)
        editable = rows.any(0)
        first = int(torch.where(editable.any(), editable.int().argmax(), -1))  # one read
        return rows, (first if first >= 0 else None)

    return per_forward(context, "var_rows", key, first_row)


def _selected_share(selected: torch.Tensor, q_len: int) -> float:
    """The share of the call's (head, query) rows that were edited (``selected`` covers its last rows)."""
    return float(selected.sum()) / (selected.shape[0] * selected.shape[1] * q_len)


# ---- attention -------------------------------------------------------------------------------------------------
@register_method(
    "var",
    config=VARConfig,
    category="sink",
    families=("lvlm",),
    patterns=("causal-self",),
    make_state=make_var_state,
    state_cls=VARState,
    install=install_sink_probes,
    paper="Kang, Kim, Kim, Hwang, See What You Are Told: Visual Attention Sink in Large Multimodal Models "
    "(ICLR 2025), arXiv 2503.03321",
)
def var_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """Image-centric heads give the attention of sink tokens to the image's other tokens (visual sink recycling)."""
    state = module.patchattn
    config, kept = state.config, state.method_state
    dense = dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    state.record(density=1.0)
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    if not kept.active:
        return dense
    if q_len == kv_len:
        _freeze(state, batch, kv_len)
    frozen = _frozen(state.context, kept, batch, kv_len, query.device)
    if frozen is None or config.recycled == 0.0:
        state.record(selected=0.0)
        return dense
    if kwargs.get("sliding_window") or kwargs.get("softcap") is not None:
        state.record(selected=0.0)  # a window can hide the image; soft-capped scores are not the kernel's
        return dense
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        warnings.warn("patchattn var is training-free: its one class-mass pass (kernels/colclass) is forward only "
                      "and carries no gradient, so gradients through the edited rows are not exact (the dense "
                      "part's are)", stacklevel=2)
        query, key, value = query.detach(), key.detach(), value.detach()  # warned once here, not by the kernel too
    image, sinks, classes = frozen
    starts = per_forward(state.context, "var_starts", (attention_mask, batch, kv_len),
                         lambda: key_starts(attention_mask, batch, kv_len))
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    backend = config.backend if use_fused_kernel(config.backend, query) else "torch"
    rows, lo = _rows_from(state.context, kept, image, attention_mask, starts, q_len)
    if lo is None:  # e.g. a prefill whose image is at the end
        state.record(selected=0.0)
        return dense
    correction, selected = redistribute(query[:, :, lo:], key, value, image, sinks, rows[:, lo:],
                                        recycled=config.recycled, rho=config.rho, summ=config.summ,
                                        budget=config.budget, scale=scale, starts=starts, backend=backend,
                                        classes=classes)
    state.record(selected=functools.partial(_selected_share, selected, q_len))  # computed when read
    out = dense[0]  # [B, Tq, Hq, D]
    if not out.requires_grad:  # the usual (inference) case: one in-place add, computed in fp32, rounded once
        out[:, lo:].add_(correction.transpose(1, 2))
        return out, None
    tail = out[:, lo:]
    edited = (tail.to(correction.dtype) + correction.transpose(1, 2)).to(out.dtype)
    tail = torch.where(selected.transpose(1, 2)[..., None], edited, tail)
    return torch.cat([out[:, :lo], tail], dim=1), None


# ---- eager oracle ----------------------------------------------------------------------------------------------
def var_reference(q, k, v, image, sinks, rows, *, p, rho, summ, budget="all", scale=None, starts=None, allowed=None):
    """The released code's computation on materialised probabilities (tests, tiny inputs): ``(out, A, A', selected)``.

    q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]``; ``image`` / ``sinks`` bool ``[B, Tk]``; ``rows`` bool ``[B, Tq]``;
    ``p``: the fraction recycled; ``allowed``: bool ``[B, 1, Tq, Tk]`` visibility (default causal + left padding).
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_len, kv_len = q.shape[2], k.shape[2]
    keys = torch.arange(kv_len)
    if allowed is None:
        allowed = keys[None, :] <= (torch.arange(q_len) + kv_len - q_len)[:, None]
        allowed = allowed[None, None].expand(q.shape[0], 1, -1, -1)
        if starts is not None:
            allowed = allowed & (keys >= starts.long().view(-1, 1, 1, 1))
    if starts is not None:
        sinks = sinks & (keys[None] >= starts.long()[:, None])
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    img, sink = image[:, None, None, :], sinks[:, None, None, :]
    vis_sink, non_sink_img = img & sink, img & ~sink
    givers = sink if budget == "all" else vis_sink
    on_image = (probs * img).sum(-1)
    portion = (probs * vis_sink).sum(-1) / on_image.clamp_min(torch.finfo(probs.dtype).tiny)
    non_sink = (probs * non_sink_img).sum(-1)
    selected = (rows[:, None] & (image & sinks).any(-1)[:, None, None] & (on_image >= summ)
                & (1 - portion >= rho) & (non_sink > 0))
    budget_mass = p * (probs * givers).sum(-1, keepdim=True)
    share = probs * non_sink_img / non_sink.clamp_min(torch.finfo(probs.dtype).tiny)[..., None]
    new = probs - p * probs * givers + budget_mass * share
    new = torch.where(selected[..., None], new, probs)
    return new @ v, probs, new, selected
