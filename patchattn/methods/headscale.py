"""``headscale`` — generic head modulation: per-layer, per-head output gains and per-head attention replacement.

The substrate of the head-modulated methods (VHR's head reinforcement, PAINT's head scaling) and of causal
interventions on heads: the Retrieval Head masking experiment (Wu et al., arXiv 2404.15574, section 4: a masked
head attends *uniformly*, i.e. its output is the mean of the visible values) and circuit-reuse ablations.

Config:

* ``gains``: ``{layer: {head: gain}}`` or ``{layer: [gain per head]}`` (JSON keys may be strings), or the name
  of a shipped artifact / a JSON path ``{"model", "num_layers", "num_heads", "gains": [L][H] numbers, "modes":
  [L][H] of null or a mode (optional), "meta"}`` (JSON only, never pickle).  Heads not named keep gain 1.
* ``modes``: ``{layer: {head: mode}}`` with mode ``"identity"`` (the head attends only to its own token: output
  = its value vector), ``"uniform"`` (attends equally to every visible key: Retrieval Head masking) or
  ``"zero"`` (output 0).  The gain multiplies the replaced output too.

How it runs: the model's own attention (SDPA) for every head, then a post-multiply by the per-head gains on the
``[B, T, H, D]`` output before ``o_proj`` (the design's hook H3) -- exact, and SDPA is the fastest dense path.
Replacement heads are computed without a T x T matrix under causal + left padding (a running mean of the
values; the mask's own rows otherwise).  Gains all 1 and no modes is bit-for-bit dense (the default).  A decode
step given ``KeyBounds`` (a static cache, a padded batch) takes the mask as is for SDPA and reads each row's real
keys on the device for the replaced heads: no host read, so it compiles whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..artifacts import check_against, load_artifact
from ..config import MethodConfig, option
from ..registry import register_method
from ..state import MethodState, PatchState
from ._heads import check_heads, dense_call, head_counts, layer_key, newest_positions, newest_values
from ._sparse import padding_start

MODES = ("identity", "uniform", "zero")


@dataclass(kw_only=True)
class HeadScaleConfig(MethodConfig):
    gains: str | dict = option(  # noqa: RUF009
        {}, "per-head output gains: {layer: {head: gain}} or {layer: [gain per head]}, a shipped artifact name or "
        "a JSON path (heads not named keep 1)")
    modes: dict = option(  # noqa: RUF009
        {}, "per-head replacement of attention: {layer: {head: 'identity'|'uniform'|'zero'}}")

    def validate(self) -> None:
        if isinstance(self.gains, str):
            load_gains(self.gains)
        else:
            for layer, row in self.gains.items():
                _gain_row(f"{self.where('gains')}[{layer!r}]", layer, row, None)
        for layer, row in self.modes.items():
            _mode_row(f"{self.where('modes')}[{layer!r}]", layer, row, None)

    def check_model(self, *, num_layers: int | None = None, num_heads: int | None = None) -> None:
        super().check_model(num_layers=num_layers, num_heads=num_heads)
        rows = [("modes", self.modes, _mode_row)]
        if isinstance(self.gains, dict):
            rows.append(("gains", self.gains, _gain_row))
        for name, table, check_row in rows:
            for layer, row in table.items():
                layer_key(self.where(name), layer, num_layers)
                check_row(f"{self.where(name)}[{layer!r}]", layer, row, num_heads)


@dataclass
class HeadScaleState(MethodState):
    """The layer's plan, fixed when patching: float ``[heads]`` gains (they follow the module's device), the
    replaced heads ``{head: mode}``, and whether the plan changes nothing (gains 1, no modes)."""

    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ("gains",)

    gains: torch.Tensor | None = None
    modes: dict[int, str] = field(default_factory=dict)
    identity: bool = True

    def shard_heads(self, shard) -> None:
        if self.gains is not None:
            self.gains = shard.local(self.gains).clone()
        self.modes = shard.local_keys(self.modes)


def _gain_row(where: str, layer, row, num_heads: int | None) -> dict[int, float]:
    """{head: gain} of one layer from a dict or a full list; ValueError saying what is allowed."""
    layer_key(where, layer)
    if isinstance(row, (list, tuple)):
        if num_heads is not None and len(row) != num_heads:
            raise ValueError(f"{where}: a list of gains must have one gain per head ({num_heads}), got {len(row)}")
        row = dict(enumerate(row))
    if not isinstance(row, dict):
        raise TypeError(f"{where} must be {{head: gain}} or a list of gains, got {row!r}")
    gains = {}
    for head, gain in row.items():
        index = layer_key(where, head) if isinstance(head, str) else head
        check_heads(where, [index], num_heads if num_heads is not None else 1 << 30)
        if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not math.isfinite(gain):
            raise ValueError(f"{where}[{head!r}]: gain must be a finite number, got {gain!r}")
        gains[index] = float(gain)
    return gains


def _mode_row(where: str, layer, row, num_heads: int | None) -> dict[int, str]:
    layer_key(where, layer)
    if not isinstance(row, dict):
        raise TypeError(f"{where} must be {{head: mode}}, got {row!r}")
    modes = {}
    for head, mode in row.items():
        index = layer_key(where, head) if isinstance(head, str) else head
        check_heads(where, [index], num_heads if num_heads is not None else 1 << 30)
        if mode not in MODES:
            raise ValueError(f"{where}[{head!r}]: mode must be one of {list(MODES)}, got {mode!r}")
        modes[index] = mode
    return modes


def load_gains(name_or_path: str) -> dict:
    """A gains artifact (``gains``: ``[num_layers][num_heads]`` numbers; optional ``modes``), checked."""
    data = load_artifact(name_or_path, "gains", "head gains")
    for layer, row in enumerate(data["gains"]):
        _gain_row(f"head gains {name_or_path!r} layer {layer}", layer, row, data["num_heads"])
    for layer, row in enumerate(data.get("modes") or []):
        _mode_row(f"head modes {name_or_path!r} layer {layer}", layer,
                  {h: m for h, m in enumerate(row) if m is not None}, data["num_heads"])
    return data


def layer_plan(config: HeadScaleConfig, model_config, layer_index: int) -> tuple[list[float], dict[int, str]]:
    """(gain per head, {head: mode}) of one layer."""
    layers, heads = model_config.num_hidden_layers, model_config.num_attention_heads
    gains, modes = [1.0] * heads, {}
    if isinstance(config.gains, str):
        data = load_gains(config.gains)
        check_against(data, model_config, "head gains")
        gains = [float(g) for g in data["gains"][layer_index]]
        artifact_modes = (data.get("modes") or [[None] * heads] * layers)[layer_index]
        modes = {h: m for h, m in enumerate(artifact_modes) if m is not None}
    else:
        for layer, row in config.gains.items():
            if layer_key("HeadScaleConfig.gains", layer, layers) == layer_index:
                for head, gain in _gain_row(f"HeadScaleConfig.gains[{layer!r}]", layer, row, heads).items():
                    gains[head] = gain
    for layer, row in config.modes.items():
        if layer_key("HeadScaleConfig.modes", layer, layers) == layer_index:
            modes.update(_mode_row(f"HeadScaleConfig.modes[{layer!r}]", layer, row, heads))
    return gains, modes


def make_headscale_state(module, config: HeadScaleConfig, layer_index, role, context) -> PatchState:
    head_counts(module)  # a clear error when the module has no model config
    gains, modes = layer_plan(config, module.config, layer_index)
    plan = HeadScaleState(gains=torch.tensor(gains, dtype=torch.float32), modes=modes,
                          identity=all(g == 1.0 for g in gains) and not modes)
    return PatchState(config, layer_index, role, context, plan)


# ---- replacement heads -----------------------------------------------------------------------------------------
def uniform_output(module, value, attention_mask, q_len: int, key_bounds=None) -> torch.Tensor:
    """``[B, Hkv, Tq, D]``: mean of the values each query row may see (Retrieval Head masking).

    ``key_bounds``: each row's real keys (a decode step: its query is the newest), read on the device."""
    kv_len = value.shape[2]
    if key_bounds is not None:
        return running_mean(value, key_bounds.starts.long(), newest_positions(key_bounds.ends, q_len))
    causal = getattr(module, "is_causal", True) and q_len > 1
    try:
        starts = padding_start(attention_mask, value.shape[0], kv_len)
        structured = True
    except ValueError:
        structured = False
    if structured and (causal or attention_mask is not None):  # running mean: no Tq x Tk tensor
        first = torch.zeros(value.shape[0], dtype=torch.long, device=value.device) if starts is None else starts.long()
        q_pos = torch.arange(q_len, device=value.device) + (kv_len - q_len)
        return running_mean(value, first, q_pos[None].expand(value.shape[0], -1))
    if attention_mask is None:  # full (non-causal) attention, or one query
        return value.float().mean(2, keepdim=True).expand(-1, -1, q_len, -1).to(value.dtype)
    allowed = attention_mask[:, 0, :, :kv_len] if attention_mask.dtype == torch.bool else \
        attention_mask[:, 0, :, :kv_len] > torch.finfo(attention_mask.dtype).min / 2
    weights = allowed.float() / allowed.float().sum(-1, keepdim=True).clamp_min(1.0)  # the mask's own rows
    return torch.einsum("bqk,bhkd->bhqd", weights, value.float()).to(value.dtype)


def running_mean(value, first, q_pos) -> torch.Tensor:
    """``[B, H, Tq, D]``: mean of the values from each row's ``first`` key ``[B]`` up to its query positions
    ``q_pos`` ``[B, Tq]`` (a running sum: no Tq x Tk tensor; a row with no key before its query gives 0)."""
    keys = torch.arange(value.shape[2], device=value.device)
    kept = value * (keys[None, :] >= first[:, None])[:, None, :, None].to(value.dtype)
    running = kept.float().cumsum(2)
    index = q_pos.clamp(min=0)[:, None, :, None].expand(-1, value.shape[1], -1, value.shape[-1])
    count = (q_pos - first[:, None] + 1).clamp_min(1).float()  # [B, Tq]
    return (running.gather(2, index) / count[:, None, :, None]).to(value.dtype)


def replaced(module, mode: str, head: int, query, value, attention_mask, key_bounds=None) -> torch.Tensor:
    """``[B, Tq, D]`` output of ``head`` under ``mode`` (``key_bounds``: each row's real keys, its query the newest)."""
    group = query.shape[1] // value.shape[1]
    q_len = query.shape[2]
    kv_head = value[:, head // group: head // group + 1]
    if mode == "zero":
        return torch.zeros_like(query[:, head])
    if mode == "identity":
        if getattr(module, "is_cross_attention", False) or value.shape[2] < q_len:
            raise ValueError("headscale mode 'identity' needs self-attention (a query's own value)")
        if key_bounds is not None:  # a static cache's empty slots follow the newest key
            return newest_values(kv_head, key_bounds.ends, q_len)[:, 0]
        return kv_head[:, 0, value.shape[2] - q_len:]
    return uniform_output(module, kv_head, attention_mask, q_len, key_bounds)[:, 0]


@register_method(
    "headscale",
    config=HeadScaleConfig,
    category="head",
    families=("llm", "lvlm"),  # DiT modules carry no model config to build its state from
    # Cross-attention exists only in DiTs here, where the head states cannot be built yet (no model config):
    # tests/test_patterns.py found the DiT cross patterns failing, so only the self-attention ones are declared.
    patterns=("causal-self", "noncausal-self"),
    make_state=make_headscale_state,
    state_cls=HeadScaleState,
    paper="Head modulation substrate: Wu et al., Retrieval Head Mechanistically Explains Long-Context Factuality, "
    "arXiv 2404.15574 (head masking = uniform attention); head gains as in VHR (He et al., ACL 2025, "
    "arXiv 2412.13949) and PAINT (Arif et al., arXiv 2501.12206)",
    key_bounds=True,
)
def headscale_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, key_bounds=None,
                        **kwargs):
    """Per-head output gains and per-head replacement of attention (identity / uniform / zero)."""
    state = module.patchattn
    plan = state.method_state
    out, weights = dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    state.record(density=1.0)
    if plan.identity:
        return out, weights
    if query.shape[1] != plan.gains.shape[0]:
        raise ValueError(f"headscale: the plan has {plan.gains.shape[0]} heads for layer {state.layer_index}, "
                         f"the call has {query.shape[1]}")
    if plan.modes:
        out = out.clone()
        for head, mode in plan.modes.items():
            out[:, :, head] = replaced(module, mode, head, query, value, attention_mask, key_bounds).to(out.dtype)
    return out * plan.gains.to(device=out.device, dtype=out.dtype)[:, None], None
