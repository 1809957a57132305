"""``act`` — Attention Calibration Technique: damp the hidden attention sinks of calibrated heads.

Yu et al., "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without Training
through Attention Calibration" (ICML 2024), arXiv 2406.15765; follows the released code (GATECH-EIC/ACT).

For each calibrated head and each sequence, at prefill:

1. **Sinks.** Column score ``s_j = (sum_i A_ij) / (N - j)`` (mean attention key j receives from the queries that
   see it); ``S = {j : s_j > threshold}`` minus the first detected index (in practice the first token: the
   initial sink is never calibrated, only the hidden ones).
2. **Calibration.** Every row keeps ``beta`` of its mass on S and gives the rest to the other keys in proportion
   to their weights: ``A'_ij = beta A_ij`` on S, ``A'_ik = A_ik (1 - beta P_i) / (1 - P_i)`` elsewhere, with
   ``P_i = sum_{j in S} A_ij``.  Row sums stay 1.  (The code's "row 0 attends only to itself" is what causal
   attention does anyway.)

**How it runs without a T x T matrix.**  The kernel gives each row's output ``O_i`` and log-sum-exp ``lse_i``
(``return_lse=True``).  Column sums for step 1 are accumulated over query chunks from ``q.k`` and ``lse``
(``O(chunk * T)`` memory, ``chunk`` rows at a time).  On a GPU (or under the interpreter; the config's ``backend``) the prefill's column scores and refined lse
come instead from ``kernels.received.received_causal`` (two fused Triton passes: row sums, then column sums; no
``T x T`` work in torch), with :func:`refine_and_score` kept as the torch path and oracle.  Step 2 is then exact
from the output: with
``S_i = sum_{j in S} p_ij v_j`` computed on the few sink columns,
``O'_i = beta S_i + (1 - beta P_i) / (1 - P_i) (O_i - S_i)``.  This equals adding the per-row score bias
``log(beta (1 - P_i) / (1 - beta P_i))`` on the sink columns; the kernel's ``col_bias`` is per column, not per
row, so the output form is used (no kernel change, one ``O(T * |S|)`` pass).  ``1 - P_i`` is taken as
``-expm1(log P_i)`` to keep precision when a row is almost all sink.  Gradients: the kernel's output is
differentiable; the lse gets its gradient from a chunked pass (``_LseGrad``), so autograd is exact too.

**Decoding.**  The sink set is found at prefill (a call with no KV-cache prefix) and frozen per sequence in
``module.patchattn.method_state.sinks`` (bool ``[B, heads, T]``), with its columns gathered once (``SinkColumns``);
later calls (decode steps, continued prefill) reuse them, since ``N - j`` means nothing for one query.  A decode
step given ``KeyBounds`` (a static cache, a padded batch) reads each row's real keys on the device: it has static
shapes and no host read (it compiles whole), and keeps nothing from the step (the frozen set is the prefill's).
Heads that are not calibrated run the model's own SDPA attention unchanged (bit for bit).  ``act_reference`` is
the eager oracle (materialises A; tests, tiny inputs).

**Heads** (``heads``): ``"auto"`` uses the shipped head list calibrated on this exact architecture
(``smollm2_act`` for SmolLM2-135M, made by ``patchattn calibrate act``) and calibrates nothing on other models
(with a warning: the paper's point is that only some heads benefit); ``"all"`` calibrates every head of the
paper's candidate layers 2..L-2 (an ablation); a shipped name or a JSON path; or a dict ``{layer: [heads]}``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..artifacts import check_against, load_artifact, shipped_for
from ..config import MethodConfig, option
from ..kernels.blocksparse import TRITON_DTYPES
from ..kernels.received import MAX_TRITON_HEAD_DIM, received_causal
from ..registry import register_method
from ..state import MethodState, PatchState
from ._heads import (
    check_heads,
    dense_call,
    full_causal_attention,
    head_counts,
    layer_key,
    newest_positions,
    use_fused_kernel,
)
from ._sparse import padding_start

AUTO, ALL = "auto", "all"
PAYLOAD = "act_heads"
HOW_TO = "calibrate heads with `patchattn calibrate act --model <name or path> --out heads.json`, then heads='heads.json'"


@dataclass(kw_only=True)
class ACTConfig(MethodConfig):
    beta: float = option(0.4, "fraction of the sink attention kept (paper: 0.4)", min=0.0, max=1.0)
    threshold: float = option(0.1, "column-mean attention above which a key is a sink (paper code: 0.1)",
                              min=0.0, max=1.0)
    heads: str | dict = option(  # noqa: RUF009
        AUTO, "calibrated heads: 'auto' (shipped list of this model, else none), 'all' (layers 2..L-2), a shipped "
        "name ('smollm2_act'), a JSON path, or {layer: [head, ...]}")
    chunk: int = option(256, "query rows per chunk of the column-sum pass (memory chunk x T per head)", min=1)

    DENSE_EQUIVALENT: ClassVar[dict] = {"beta": 1.0}

    def validate(self) -> None:
        if isinstance(self.heads, dict):
            for layer, heads in self.heads.items():
                layer_key(self.where("heads"), layer)
                if not isinstance(heads, (list, tuple)):
                    raise TypeError(f"{self.where('heads')}[{layer!r}] must be a list of head indices, got {heads!r}")
                check_heads(f"{self.where('heads')}[{layer!r}]", heads, 1 << 30)
        elif self.heads not in (AUTO, ALL):
            load_heads(self.heads)

    def check_model(self, *, num_layers: int | None = None, num_heads: int | None = None) -> None:
        super().check_model(num_layers=num_layers, num_heads=num_heads)
        if isinstance(self.heads, dict):
            for layer, heads in self.heads.items():
                layer_key(self.where("heads"), layer, num_layers)
                if num_heads is not None:
                    check_heads(f"{self.where('heads')}[{layer!r}]", heads, num_heads)


@dataclass(frozen=True)
class SinkColumns:
    """A frozen sink set as the columns ``calibrate`` reads: ``order`` long ``[B, n, M]`` (each head's sink keys
    first, ascending; M the most sinks of any head, at least 1) and ``valid`` bool ``[B, n, M]`` (a sink, not filler);
    ``found``: whether any head has a sink (host bool, read once at prefill)."""

    order: torch.Tensor
    valid: torch.Tensor
    found: bool


@dataclass
class ACTState(MethodState):
    """The layer's calibrated query heads (long ``[n]``, fixed when patching; they follow the module's device) and
    the sink set the latest prefill found (bool ``[B, n, T]``, and its ``SinkColumns``), frozen for the calls that
    follow."""

    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ("heads",)

    heads: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    sinks: torch.Tensor | None = None
    columns: SinkColumns | None = None

    def shard_heads(self, shard) -> None:
        self.heads = shard.local_indices(self.heads)


# ---- head lists ------------------------------------------------------------------------------------------------
def load_heads(name_or_path: str) -> dict:
    """An ACT head artifact (``act_heads``: ``[num_layers][num_heads]`` of 0/1), checked."""
    data = load_artifact(name_or_path, PAYLOAD, "ACT head list")
    if not all(v in (0, 1) for row in data[PAYLOAD] for v in row):
        raise ValueError(f"ACT head list {name_or_path!r}: every entry of {PAYLOAD!r} must be 0 or 1")
    return data


def layer_heads(config: ACTConfig, model_config, layer_index: int) -> list[int]:
    """The calibrated query heads of one layer."""
    layers, heads = model_config.num_hidden_layers, model_config.num_attention_heads
    spec = config.heads
    if isinstance(spec, dict):
        chosen = {layer_key("ACTConfig.heads", k, layers): v for k, v in spec.items()}
        return check_heads(f"ACTConfig.heads[{layer_index}]", chosen.get(layer_index, []), heads)
    if spec == ALL:
        return list(range(heads)) if 2 <= layer_index <= layers - 2 else []
    name = shipped_for(model_config, PAYLOAD) if spec == AUTO else spec
    if name is None:
        warnings.warn(f"patchattn act: no calibrated ACT heads for this model, so nothing is calibrated; {HOW_TO}",
                      stacklevel=2)
        return []
    data = load_heads(name)
    check_against(data, model_config, "ACT head list")
    return [h for h, on in enumerate(data[PAYLOAD][layer_index]) if on]


def make_act_state(module, config: ACTConfig, layer_index, role, context) -> PatchState:
    head_counts(module)  # raises a clear error without a model config
    chosen = layer_heads(config, module.config, layer_index)
    return PatchState(config, layer_index, role, context, ACTState(heads=torch.tensor(chosen, dtype=torch.long)))


# ---- the chunked pieces ----------------------------------------------------------------------------------------
def _allowed(q_pos, kv_len, starts, device):
    """bool ``[B|1, 1, C, Tk]``: causal and not padding (keys and query rows).  ``q_pos``: the query rows' positions,
    ``[C]``, or ``[B, C]`` when they differ per row (a decode step given ``KeyBounds``: keys after a row's newest
    token, a static cache's empty slots, are then not causal)."""
    keys = torch.arange(kv_len, device=device)
    q_pos = q_pos if q_pos.ndim == 2 else q_pos[None]
    ok = keys.view(1, 1, -1) <= q_pos[..., None]
    if starts is not None:
        start = starts.to(device).long().view(-1, 1, 1)
        ok = ok & (keys.view(1, 1, -1) >= start) & (q_pos[..., None] >= start)
    return ok[:, None]


def query_positions(q_len: int, kv_len: int, ends=None, device=None) -> torch.Tensor:
    """Positions of a call's query rows: the last ``q_len`` of the keys (``[Tq]``), or of each row's real keys when
    ``ends`` (``KeyBounds.ends``) says where they stop (``[B, Tq]``)."""
    if ends is None:
        return torch.arange(q_len, device=device) + (kv_len - q_len)
    return newest_positions(ends, q_len)


def _chunk_probs(q, k, lse, lo, hi, scale, starts, ends=None):
    """Softmax probabilities of query rows ``lo:hi`` against every key, ``[B, n, C, Tk]`` (0 where not allowed)."""
    kv_len, q_len = k.shape[2], q.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q[:, :, lo:hi].to(compute), k.to(compute).transpose(-1, -2)) * scale
    q_pos = query_positions(q_len, kv_len, ends, q.device)[..., lo:hi]
    ok = _allowed(q_pos, kv_len, starts, q.device) & torch.isfinite(lse[:, :, lo:hi, None])
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[:, :, lo:hi, None]
    return torch.where(ok, torch.exp(scores - safe_lse.to(compute)), torch.zeros((), dtype=compute, device=q.device))


class _LseGrad(torch.autograd.Function):
    """lse from the kernel (no gradient there), given its exact gradient by a chunked pass.

    d lse_i / d q_i = scale * sum_j p_ij k_j;  d lse_i / d k_j = scale * p_ij q_i.
    """

    @staticmethod
    def forward(ctx, q, k, lse, scale, starts, chunk, ends=None):
        ctx.save_for_backward(q, k, lse)
        ctx.scale, ctx.starts, ctx.chunk, ctx.ends = scale, starts, chunk, ends
        return lse.clone()

    @staticmethod
    def backward(ctx, grad):
        q, k, lse = ctx.saved_tensors
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq = torch.zeros(q.shape, dtype=compute, device=q.device)
        dk = torch.zeros(k.shape, dtype=compute, device=k.device)
        for lo in range(0, q.shape[2], ctx.chunk):
            hi = min(q.shape[2], lo + ctx.chunk)
            probs = _chunk_probs(q, k, lse, lo, hi, ctx.scale, ctx.starts, ctx.ends)
            weighted = probs * grad[:, :, lo:hi, None].to(dq.dtype)
            dq[:, :, lo:hi] = torch.matmul(weighted, k.to(dq.dtype)) * ctx.scale
            dk += torch.matmul(weighted.transpose(-1, -2), q[:, :, lo:hi].to(dq.dtype)) * ctx.scale
        return dq.to(q.dtype), dk.to(k.dtype), None, None, None, None, None


def refine_and_score(q, k, lse, scale, starts, chunk, *, columns: bool, ends=None):
    """One chunked pass over ``q.k``: (lse recomputed at the inputs' precision, ``[B, n, Tq]``; column scores).

    The kernel returns lse in fp32; renormalising each row here makes fp64 inputs exact and costs nothing extra
    at prefill, where the pass runs anyway for the column scores ``s_j = sum_i A_ij / (N - j)`` (``[B, n, Tk]``,
    only when ``columns``; needs Tq == Tk).  Never a T x T matrix: ``chunk`` rows at a time.  ``ends``: each row's
    real keys stop there (``KeyBounds.ends``; its queries are the last of them).
    """
    kv_len = k.shape[2]
    with torch.no_grad():
        sums, refined = None, []
        for lo in range(0, q.shape[2], chunk):
            hi = min(q.shape[2], lo + chunk)
            probs = _chunk_probs(q, k, lse, lo, hi, scale, starts, ends)
            row = probs.sum(-1, keepdim=True)
            refined.append(lse[:, :, lo:hi].to(row.dtype) + torch.log(row[..., 0]))
            if columns:
                part = (probs / torch.where(row > 0, row, torch.ones_like(row))).sum(2)
                sums = part if sums is None else sums + part
        lse = torch.cat(refined, dim=2)
        if not columns:
            return lse, None
        seen_by = torch.arange(kv_len, 0, -1, device=q.device, dtype=sums.dtype)
        return lse, sums / seen_by


def prefill_scores(q, k, lse, scale, starts, config: ACTConfig, ends=None):
    """(refined lse, column scores) of a prefill: the fused causal received passes (``kernels.received``, two
    Triton passes, no ``T x T`` work in torch) where the config's ``backend`` runs Triton for these inputs, else
    :func:`refine_and_score` (the torch oracle).  Both run without gradient (``_LseGrad`` supplies the lse's)."""
    if use_fused_kernel(config.backend, q) and q.dtype in TRITON_DTYPES and q.shape[-1] <= MAX_TRITON_HEAD_DIM:
        return received_causal(q, k, lse, scale=scale, starts=starts, ends=ends, backend="triton")
    return refine_and_score(q, k, lse, scale, starts, config.chunk, columns=True, ends=ends)


def sink_set(scores: torch.Tensor, threshold: float, starts) -> torch.Tensor:
    """bool ``[B, n, Tk]``: keys above ``threshold``, minus the first detected one per (sequence, head)."""
    above = scores > threshold
    if starts is not None:
        keys = torch.arange(scores.shape[-1], device=scores.device)
        above &= keys >= starts.to(scores.device).long().view(-1, 1, 1)
    first = above.int().argmax(-1, keepdim=True)
    return above.scatter(-1, first, False)


def sink_columns(sinks: torch.Tensor) -> SinkColumns:
    """The columns of a sink set (bool ``[B, n, Tk]``) that ``calibrate`` reads; one host read (the widest head),
    done once per sequence at prefill."""
    width = max(1, int(sinks.sum(-1).max()))
    order = torch.where(sinks, 0, 1).argsort(dim=-1, stable=True)[..., :width]  # sink columns first
    return SinkColumns(order, torch.gather(sinks, -1, order), bool(sinks.any()))


def calibrate(out, lse, q, k, v, sinks, beta, scale, starts, ends=None) -> torch.Tensor:
    """``O' = beta S + (1 - beta P) / (1 - P) (O - S)`` per row, from the sink columns only; ``[B, n, Tq, D]``.

    ``sinks``: bool ``[B, n, Tk]`` or its ``SinkColumns``; ``ends``: each row's real keys stop there (its queries are
    the last of them)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    columns = sinks if isinstance(sinks, SinkColumns) else sink_columns(sinks)
    order, valid = columns.order.to(q.device), columns.valid.to(q.device)  # [B, n, M]
    k_s = torch.gather(k, 2, order[..., None].expand(-1, -1, -1, k.shape[-1])).to(compute)
    v_s = torch.gather(v, 2, order[..., None].expand(-1, -1, -1, v.shape[-1])).to(compute)
    scores = torch.matmul(q.to(compute), k_s.transpose(-1, -2)) * scale  # [B, n, Tq, M]
    q_pos = query_positions(q.shape[2], k.shape[2], ends, q.device)
    q_pos = q_pos.view(-1, 1, q.shape[2], 1)  # [B|1, 1, Tq, 1]
    ok = valid[:, :, None, :] & (order[:, :, None, :] <= q_pos)
    if starts is not None:
        ok = ok & (q_pos >= starts.to(q.device).long().view(-1, 1, 1, 1))
    row_ok = torch.isfinite(lse)[..., None]
    safe_lse = torch.where(row_ok[..., 0], lse, torch.zeros_like(lse)).to(compute)[..., None]
    logits = torch.where(ok & row_ok, scores - safe_lse, torch.full_like(scores, float("-inf")))
    log_mass = torch.logsumexp(logits, dim=-1, keepdim=True).clamp(max=0.0)  # log P_i
    probs = torch.exp(logits)
    sink_out = torch.matmul(probs, v_s)  # S_i
    mass = torch.exp(log_mass)
    rest = -torch.expm1(log_mass)  # 1 - P_i
    ratio = torch.where(mass > 0, (1 - beta * mass) / rest.clamp_min(torch.finfo(compute).tiny), torch.ones_like(mass))
    return (beta * sink_out + ratio * (out.to(compute) - sink_out)).to(out.dtype)


def _frozen_columns(state, batch, n_heads, kv_len) -> SinkColumns | None:
    """The prefill's sink columns; None when there is none for this batch (or it was longer than these keys)."""
    kept = state.method_state
    sinks, columns = kept.sinks, kept.columns
    if sinks is None or columns is None or sinks.shape[:2] != (batch, n_heads) or sinks.shape[-1] > kv_len:
        return None
    return columns


# ---- attention -------------------------------------------------------------------------------------------------
@register_method(
    "act",
    config=ACTConfig,
    category="sink",
    families=("llm", "lvlm"),
    patterns=("causal-self",),
    make_state=make_act_state,
    state_cls=ACTState,
    paper="Yu et al., Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without "
    "Training through Attention Calibration (ICML 2024), arXiv 2406.15765",
    key_bounds=True,
)
def act_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, key_bounds=None,
                  **kwargs):
    """Hidden attention sinks of calibrated heads keep beta of their mass; the rest goes to the other tokens."""
    state = module.patchattn
    config = state.config
    heads = state.method_state.heads.to(query.device)
    dense = dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    state.record(density=1.0)  # every key is read; only the calibrated heads' weights change
    if heads.numel() == 0 or config.beta == 1.0:
        return dense
    batch, n_q_heads = query.shape[:2]
    kv_len = key.shape[2]
    ends = None
    try:
        if kwargs.get("sliding_window") or kwargs.get("softcap") is not None:
            raise ValueError("sliding-window / soft-capped layers are not supported")
        if key_bounds is not None:  # a decode step: each row's real keys, read on the device
            starts, ends = key_bounds.starts, key_bounds.ends
        else:
            starts = padding_start(attention_mask, batch, kv_len)
    except ValueError as err:
        warnings.warn(f"patchattn act: {err}; this call runs dense attention", stacklevel=2)
        return dense
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    group = n_q_heads // key.shape[1]
    q_sel, k_sel, v_sel = query[:, heads], key[:, heads // group], value[:, heads // group]
    out, _ = calibrated_heads(state, q_sel, k_sel, v_sel, scale, starts, ends)
    merged = dense[0].index_copy(2, heads, out.transpose(1, 2).to(dense[0].dtype))
    return merged, None


def calibrated_heads(state, q, k, v, scale, starts, ends=None):
    """ACT on the gathered calibrated heads (``[B, n, T, D]`` each, one kv head per query head).

    ``ends`` (a decode step given ``KeyBounds``, with ``starts``): each row's real keys are ``[starts, ends)`` and its
    query the newest of them; the step reads the prefill's frozen columns and nothing from the host."""
    config = state.config
    q_len, kv_len = q.shape[2], k.shape[2]
    backend = config.backend if use_fused_kernel(config.backend, q) else "torch"
    out, lse = full_causal_attention(q, k, v, scaling=scale, kv_start=starts, kv_end=ends, backend=backend,
                                     return_lse=True)
    prefill = q_len == kv_len
    lse, scores = prefill_scores(q, k, lse, scale, starts, config, ends) if prefill else refine_and_score(
        q, k, lse, scale, starts, config.chunk, columns=False, ends=ends)
    if prefill:  # find the sinks of this sequence and freeze them (and their columns) for the calls that follow
        sinks = sink_set(scores, config.threshold, starts)
        kept = state.method_state
        kept.sinks, kept.columns = sinks, sink_columns(sinks)
        state.record(sinks_per_head=sinks.sum(-1).float().mean() if kept.columns.found else 0.0)
        columns = kept.columns
    else:
        columns = _frozen_columns(state, q.shape[0], q.shape[1], kv_len)
        if columns is None:
            state.record(sinks_per_head=0.0)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        lse = _LseGrad.apply(q, k, lse, scale, starts, config.chunk, ends)
    if columns is None or not columns.found:
        return out, lse
    return calibrate(out, lse, q, k, v, columns, config.beta, scale, starts, ends), lse


# ---- eager oracle ----------------------------------------------------------------------------------------------
def act_reference(q, k, v, heads, *, beta, threshold, scale=None, starts=None, sinks=None):
    """The spec's computation on materialised probabilities (tests, tiny inputs): ``(out [B, Hq, Tq, D], A, A')``.

    q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]``; ``heads``: calibrated query heads; ``starts``: ``[B]`` left-padding
    starts; ``sinks``: a frozen bool ``[B, len(heads), Tk]`` set (decode), else detected here (needs Tq == Tk).
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_len, kv_len = q.shape[2], k.shape[2]
    q_pos = torch.arange(q_len, device=q.device) + (kv_len - q_len)
    allowed = _allowed(q_pos, kv_len, starts, q.device)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    new = probs.clone()
    for slot, h in enumerate(heads):
        a = probs[:, h]
        if sinks is None:
            col = a.sum(1) / torch.arange(kv_len, 0, -1, device=q.device, dtype=a.dtype)
            s = sink_set(col[:, None], threshold, starts)[:, 0]
        else:
            s = sinks[:, slot]
        on_sink = a * s[:, None, :]
        freed = (1 - beta) * on_sink.sum(-1, keepdim=True)
        off_sink = a * ~s[:, None, :]
        share = off_sink / off_sink.sum(-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        new[:, h] = beta * on_sink + off_sink + freed * share
    return new @ v, probs, new
