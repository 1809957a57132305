"""``moa`` — MoA, Mixture of Sparse Attention: per-head elastic sliding windows from a calibration plan.

Each head ``h`` reads the sink block(s) and a causal band of ``S_h(N) = alpha_h + beta_h * N`` recent tokens, ``N``
being the sequence length, so some heads widen with the input and others stay local (Fu et al., "MoA: Mixture of
Sparse Attention for Automatic Large Language Model Compression", arXiv 2406.14909).  The rules come from a
*plan*: JSON ``{"model", "num_layers", "num_heads", "rules": [[[alpha, beta] per head] per layer], "meta"}`` made
by ``python -m patchattn.calibrate.moa`` (``plan="smollm2"`` is shipped, calibrated on SmolLM2-135M; measured, it
loses badly to the uniform plan at the same density — x4.19 perplexity at 8k vs x1.12, bench/quality/RESULTS.md —
so use it only to study the calibrator).

The default ``plan="uniform"`` is **uncalibrated**: every head gets ``alpha = 0`` and the ``beta`` whose causal
band reads a ``density`` fraction of the causal triangle (``2 beta - beta^2 = density``), i.e. one
length-proportional window for all heads — the baseline MoA improves on.

Deviations: windows are block-granular (``block_size`` 64 as the paper's kernel; a band is rounded out to whole
blocks, never less than asked); ``N`` is the number of keys of the call (the prompt at prefill, prompt + generated
tokens while decoding) rather than a span frozen at the prompt length, so decoding and a full recompute agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..artifacts import check_against, load_artifact
from ..config import option
from ..masks import BlockGeometry, rows_lists, sink_and_window, sink_and_window_device_rows
from ..state import PatchState
from ._shared import per_head_window_lists
from ._sparse import SparseConfig, SparseState, decode_width, register_sparse_method

UNIFORM = "uniform"


@dataclass(kw_only=True)
class MoAConfig(SparseConfig):
    plan: str = option(UNIFORM, "'uniform' (uncalibrated: one proportional window), a shipped plan name "
                       "('smollm2') or a path to a plan JSON from `python -m patchattn.calibrate.moa`")
    density: float = option(0.5, "target density, the common knob of the sparse methods (docs/density.md): the "
                            "uniform plan's band 2b - b^2 = density, and the calibrator's budget (paper: 0.5)",
                            min=0.0, max=1.0)
    sink_blocks: int = option(1, "initial blocks always read (paper: one 64-token global block)", min=0)

    DENSE_EQUIVALENT: ClassVar[dict] = {"plan": UNIFORM, "density": 1.0}

    def fields_for_density(self, density: float, geometry: BlockGeometry) -> dict:
        """None to set: ``density`` is moa's own field, its uniform band already follows the length
        (``uniform_beta``; token-granular, so whole blocks and the sink block read a little more).  A calibrated plan's
        rules carry the budget they were calibrated for."""
        return {}

    def validate(self) -> None:
        if self.plan != UNIFORM:
            load_plan(self.plan)  # fails now, naming the shipped plans, rather than at the first forward


@dataclass
class MoAState(SparseState):
    """The layer's ``[heads, 2]`` (alpha, beta) rules, on the host (the windows are host integers), fixed when
    patching; None until then (the rules are then read from the config at each call)."""

    rules: torch.Tensor | None = None

    def shard_heads(self, shard) -> None:
        if self.rules is not None:
            self.rules = shard.local(self.rules).clone()


# Bounds of a rule: alpha is a token offset (the kernels index tokens with int32, so a window never needs more than
# that many tokens either way), beta a fraction of the length (1 already reads every key).
MAX_ALPHA = 2**31 - 1
BETA_RANGE = (0.0, 1.0)


def load_plan(name_or_path: str) -> dict:
    """A plan JSON, checked: ``rules`` is ``[num_layers][num_heads]`` pairs ``[alpha, beta]`` of finite numbers,
    ``|alpha| <= MAX_ALPHA`` tokens and ``beta`` in ``BETA_RANGE``."""
    data = load_artifact(name_or_path, "rules", "MoA plan")
    for layer, row in enumerate(data["rules"]):
        for head, rule in enumerate(row):
            check_rule(f"MoA plan {name_or_path!r}: rules[{layer}][{head}] (layer {layer}, head {head})", rule)
    return data


def check_rule(where: str, rule) -> None:
    """ValueError naming the rule, its value and what is allowed, unless it is ``[alpha, beta]`` within bounds."""
    allowed = (f"allowed: [alpha, beta] with alpha a token offset in [-{MAX_ALPHA}, {MAX_ALPHA}] and beta in "
               f"[{BETA_RANGE[0]}, {BETA_RANGE[1]}]")
    numbers = isinstance(rule, list) and len(rule) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in rule)
    if not numbers or not all(math.isfinite(x) for x in rule):
        raise ValueError(f"{where} is {rule!r}; {allowed}")
    alpha, beta = rule
    if not -MAX_ALPHA <= alpha <= MAX_ALPHA:
        raise ValueError(f"{where}: alpha {alpha!r} is out of range; {allowed}")
    if not BETA_RANGE[0] <= beta <= BETA_RANGE[1]:
        raise ValueError(f"{where}: beta {beta!r} is out of range; {allowed}")


def uniform_beta(density: float) -> float:
    """The band fraction whose causal band covers ``density`` of the causal triangle: 2b - b^2 = density."""
    return 1.0 - math.sqrt(max(0.0, 1.0 - density))


def layer_rules(config: MoAConfig, model_config, layer: int, heads: int) -> torch.Tensor:
    """``[heads, 2]`` (alpha, beta) of one layer."""
    if config.plan == UNIFORM:
        return torch.tensor([[0.0, uniform_beta(config.density)]]).expand(heads, 2)
    data = load_plan(config.plan)
    if model_config is not None:
        check_against(data, model_config, "MoA plan")
    if layer >= data["num_layers"] or heads != data["num_heads"]:
        raise ValueError(f"MoA plan {config.plan!r} has {data['num_layers']} layers x {data['num_heads']} heads; "
                         f"this call is layer {layer} with {heads} heads")
    return torch.tensor(data["rules"][layer], dtype=torch.float64)


def head_windows(rules: torch.Tensor, n: int) -> list[int]:
    """Window of each head at length ``n``: ``alpha + beta * n`` tokens, at least 1 (the query itself)."""
    return [max(1, math.ceil(alpha + beta * n)) for alpha, beta in rules.tolist()]


def make_moa_state(module, config, layer_index, role, context) -> PatchState:
    """Validate the plan against the model when patching, so a wrong plan fails before any forward."""
    model_config = getattr(module, "config", None)
    heads = getattr(model_config, "num_attention_heads", None)
    rules = layer_rules(config, model_config, layer_index, heads) if heads else None
    return PatchState(config, layer_index, role, context, MoAState(rules=rules))


def select_windows(g, query, key, state):
    rules = state.method_state.rules
    if rules is None or rules.shape[0] != query.shape[1]:
        rules = layer_rules(state.config, None, state.layer_index, query.shape[1])
    sink = state.config.sink_blocks * g.block_k
    # Elastic windows scale with the sequence: a context-parallel chunk's is the whole prompt (PatchContext).
    windows = head_windows(rules, state.context.prefill_tokens or g.kv_len)
    if g.n_q == 1:  # decoding: the rows as lists, kept while their bounds hold (no kernels within a key block)
        return per_head_window_lists(g, sink, windows, decode_width(state.config, g), query.device)
    masks = {w: sink_and_window(g, sink, w, device=query.device) for w in set(windows)}
    return torch.stack([masks[w] for w in windows])  # [Hq, NQ, NK]


def decode_windows(state, query, rows):
    """Decoding rows of different lengths: ``[B, Hq, 1]`` each head's window at each row's length (``head_windows``
    on the device)."""
    rules = state.method_state.rules
    if rules is None or rules.shape[0] != query.shape[1]:
        rules = layer_rules(state.config, None, state.layer_index, query.shape[1])
    rules = rules.to(device=query.device, dtype=torch.float64)
    lengths = rows.lengths.to(torch.float64).reshape(-1, 1)
    return torch.ceil(rules[:, 0] + rules[:, 1] * lengths).clamp(min=1).to(torch.int64)[..., None]


def decode_rows_windows(rows, query, key, state):
    sink = state.config.sink_blocks * rows.block_k
    runs = sink_and_window_device_rows(rows, sink, decode_windows(state, query, rows))
    return rows_lists(runs, decode_width(state.config, rows.geometry()), query.device)


moa_attention = register_sparse_method(
    "moa",
    config=MoAConfig,
    make_state=make_moa_state,
    paper="Fu et al., MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression "
    "(COLM 2025), arXiv 2406.14909",
    select=select_windows,
    decode_rows=decode_rows_windows,
    state_cls=MoAState,
    static=True,
    doc="Per-head elastic sliding windows alpha_h + beta_h * N plus the sink block, from a calibrated plan.",
)
