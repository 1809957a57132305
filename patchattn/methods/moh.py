"""``moh`` — Mixture-of-Head attention: shared heads always on, routed heads picked per token, gated outputs.

Jin et al., "MoH: Multi-Head Attention as Mixture-of-Head Attention" (ICML 2025), arXiv 2410.11842.
The layer output is ``O = sum_i g_i H^i W_O^i``: ``shared_heads`` are always active, and each token activates
``top_k`` of the routed heads (default: enough for ``active_ratio`` = 75% of all heads, the MoH-LLaMA3-8B setting
of 16 shared + 8 of 16 routed).  Gates multiply the per-head outputs before ``o_proj``.

Routers (``router``):

* ``"norm"`` — the parameter-free router the paper uses to convert a pretrained LLaMA3 (spec section 7.2): logits
  are the L2 norms of the routed heads' query vectors divided by their std across the routed heads; top-k;
  **binary** gates (1 for shared and selected heads).  RoPE is a rotation, so the norm after RoPE (what the
  attention function receives) equals the norm before it.
* ``"learned"`` — a linear router per layer with the paper's gates: routed ``p = softmax(logits)``, keep top-k,
  renormalise within the top-k and multiply by k; shared ``softmax(W_s x) * h_s``; head-type balance
  ``[a1, a2] = 2 softmax(W_h x)`` multiplying shared / routed gates.  *Deviation, and why:* the attention
  function sees q/k/v, not the hidden state x, so the routers read the token's value vectors ``v = x W_v``
  (no RoPE: a linear function of x, of rank ``Hkv * head_dim``) instead of x; and the routed logits are
  ``norm logits + W_r v + b_r`` — a learned correction of the parameter-free router — so a freshly patched
  pretrained model starts from the query-norm choice instead of a random one (``W_s``, ``W_h`` start at 0, so
  shared and type gates start at exactly 1; ``W_r`` starts at ``N(0, init_std)`` from ``seed``).

Trainable state (the trainer relies on this): the learned router's parameters are ``nn.Parameter`` s on the
module's ``PatchState``, created at patch time, so ``model.named_parameters()`` lists them as
``...self_attn.patchattn.router_weight`` / ``router_bias`` / ``shared_weight`` / ``type_weight``; save every
parameter whose name contains ``.patchattn.`` and load it back after ``patchattn.patch``.  Each forward stores the
layer's load-balance loss ``L_b = N_r * sum_i P_i f_i`` (P_i: mean routing probability of routed head i over the
real tokens, f_i: fraction of the top-k slots that went to head i, so uniform routing gives 1) in
``state.method_state.balance_loss`` with its graph; :func:`aux_loss` returns ``balance_coef`` (paper 0.01) times
the sum over layers, to add to the language-model loss.

DiTs (the MoH paper also reports DiT results, trained from scratch): self and joint attention route heads per token
the same way, bidirectionally (``route_block`` counts tokens in the model's order: raster order of the latent grid);
cross-attention (text keys) stays dense.  Without fine-tuning, routing heads away changes a pretrained DiT's output.

Speed: the fused kernel gets ``active [B, T, H]`` and skips a (query tile, head) only when **no** row of the tile
is active.  With per-token routing (``route_block=1``, the paper) almost every 64-row tile has some token that
picked each head, so the kernel saves ~nothing; ``route_block=R`` (a multiple of the kernel tile, e.g. 128) makes
the tokens of each R-token block share the routing decision of the block's first real token (causal: a token
never routes on a later one), so whole tiles are skipped and the work drops to about the active ratio.
``state.stats`` reports ``density`` (fraction of (token, head) pairs computed) and ``tile_skip`` (fraction of
64-row (tile, head) pairs the kernel skips).  On CPU (no Triton) the method runs the model's SDPA and multiplies
by the gates (same maths, nothing skipped).  ``active_ratio=1`` with the norm router is exactly dense.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import MethodConfig, option
from ..registry import register_method
from ..state import MethodState, PatchState, get_state
from ._dit import dense_sdpa
from ._heads import (
    check_heads,
    dense_call,
    full_causal_attention,
    full_noncausal_attention,
    head_counts,
    newest_positions,
    newest_values,
    use_fused_kernel,
    valid_rows,
)
from ._sparse import padding_start

ROUTERS = ("norm", "learned")
KERNEL_TILE = 64  # the kernel's smallest query tile; tile_skip is reported at this size


@dataclass(kw_only=True)
class MoHConfig(MethodConfig):
    shared_heads: int | list | None = option(  # noqa: RUF009
        None, "always-active heads: a count (the first n heads), a list of head indices, or None for the first "
        "half (paper: 16 of 32)")
    active_ratio: float = option(0.75, "fraction of all heads active per token (paper: 0.75)", min=0.0, max=1.0)
    top_k: int | None = option(None, "routed heads active per token (overrides active_ratio)", min=0)
    router: str = option("norm", "'norm': parameter-free query-norm router (MoH-LLaMA3); 'learned': linear "
                         "routers with the paper's gates and load-balance loss", choices=ROUTERS)
    route_block: int = option(1, "tokens sharing one routing decision (1 = per token, the paper; a multiple of "
                              "64 lets the kernel skip whole tiles)", min=1)
    balance_coef: float = option(0.01, "load-balance loss coefficient (paper: 0.01), applied by aux_loss()", min=0.0)
    init_std: float = option(1e-3, "std of the learned routed-router weights at patch time", min=0.0)
    seed: int = option(0, "seed of the learned router's initialisation", min=0)

    DENSE_EQUIVALENT: ClassVar[dict] = {"active_ratio": 1.0}

    def validate(self) -> None:
        if isinstance(self.shared_heads, list):
            check_heads(self.where("shared_heads"), self.shared_heads, 1 << 30)
        elif isinstance(self.shared_heads, int) and self.shared_heads < 0:
            raise ValueError(f"{self.where('shared_heads')} must be a count >= 0 or a list of head indices, "
                             f"got {self.shared_heads}")

    def check_model(self, *, num_layers: int | None = None, num_heads: int | None = None) -> None:
        super().check_model(num_layers=num_layers, num_heads=num_heads)
        if num_heads is not None:
            head_plan(self, num_heads)  # shared heads and top_k against the model's head count


@dataclass
class MoHState(MethodState):
    """The layer's head plan, fixed when patching (shared and routed head indices, long; they follow the module's
    device; routed heads active per token), the latest forward's load-balance loss (with its graph), and with
    ``route_block > 1`` the routing block the last token was in and its selection ``[B, Nr]``, for the next call:
    buffers made by the first call of a batch shape (a prefill) and updated in place after, so a compiled decode
    step keeps none of its own outputs (a CUDA graph's replay overwrites those).
    The learned router's parameters are not here: they are ``nn.Parameter`` s of the ``PatchState``."""

    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ("shared", "routed")

    shared: torch.Tensor | None = None
    routed: torch.Tensor | None = None
    top_k: int = 0
    balance_loss: torch.Tensor | None = None
    last_block: torch.Tensor | None = None  # [B] block (counted from the row's first token) of the newest token
    last_selection: torch.Tensor | None = None


# ---- head plan -------------------------------------------------------------------------------------------------
def head_plan(config: MoHConfig, num_heads: int) -> tuple[list[int], list[int], int]:
    """(shared heads, routed heads, routed heads active per token), checked against ``num_heads``."""
    where = config.where("shared_heads")
    if config.shared_heads is None:
        shared = list(range(num_heads // 2))
    elif isinstance(config.shared_heads, int):
        if not 0 <= config.shared_heads <= num_heads:
            raise ValueError(f"{where} = {config.shared_heads}: a count must be in [0, {num_heads}] (the model has "
                             f"{num_heads} heads)")
        shared = list(range(config.shared_heads))
    else:
        shared = check_heads(where, config.shared_heads, num_heads)
    routed = [h for h in range(num_heads) if h not in shared]
    if config.top_k is not None:
        k = config.top_k
    else:
        k = round(config.active_ratio * num_heads) - len(shared)
    if not 0 <= k <= len(routed):
        raise ValueError(f"moh: {len(shared)} shared heads of {num_heads} leave {len(routed)} routed heads; the "
                         f"routed heads active per token (top_k, or active_ratio*heads - shared = {k}) must be in "
                         f"[0, {len(routed)}]")
    return shared, routed, k


def make_moh_state(module, config: MoHConfig, layer_index, role, context) -> PatchState:
    """Fix the head plan and create the learned router's parameters (deterministic from ``seed`` and the layer)."""
    heads, kv_heads, head_dim = head_counts(module)
    shared, routed, k = head_plan(config, heads)
    plan = MoHState(shared=torch.tensor(shared, dtype=torch.long), routed=torch.tensor(routed, dtype=torch.long), top_k=k)
    state = PatchState(config, layer_index, role, context, plan)
    if config.router == "learned":
        features = kv_heads * head_dim
        device = next(module.parameters()).device
        gen = torch.Generator().manual_seed(config.seed * 100_003 + layer_index)
        weight = torch.randn(len(routed), features, generator=gen) * config.init_std
        state.router_weight = nn.Parameter(weight.to(device))
        state.router_bias = nn.Parameter(torch.zeros(len(routed), device=device))
        state.shared_weight = nn.Parameter(torch.zeros(len(shared), features, device=device))
        state.type_weight = nn.Parameter(torch.zeros(2, features, device=device))
    return state


# ---- routing ---------------------------------------------------------------------------------------------------
def norm_logits(query: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """``[B, Tq, Nr]`` query-norm logits of the routed heads, divided by their std across routed heads."""
    norms = query.index_select(1, routed).float().norm(dim=-1).transpose(1, 2)
    if norms.shape[-1] < 2:
        return norms
    return norms / norms.std(dim=-1, keepdim=True).clamp_min(1e-6)


def router_features(value: torch.Tensor, q_len: int, ends=None) -> torch.Tensor:
    """``[B, Tq, Hkv * D]``: this call's tokens' value vectors (a linear, RoPE-free function of x).  ``ends``
    (``KeyBounds.ends``): each row's tokens end there (a static cache's empty slots follow)."""
    v = (value[:, :, -q_len:] if ends is None else newest_values(value, ends, q_len)).float()
    return v.permute(0, 2, 1, 3).flatten(2)


def _anchored(selected: torch.Tensor, state, kv_len: int, starts, ends=None) -> torch.Tensor:
    """Per-token selections ``[B, Tq, Nr]`` -> each token uses the selection of its block's first real token.

    Blocks are counted from each row's first real token (``starts`` under left padding), as if the row were alone.
    Blocks that began in an earlier call (decoding) reuse the selection cached then.  The tokens are the last
    ``Tq`` of ``kv_len`` keys, or of each row's real keys when ``ends`` (``KeyBounds.ends``) says where they stop.
    """
    block = state.config.route_block
    batch, q_len, _ = selected.shape
    device = selected.device
    if ends is None:
        pos = (torch.arange(q_len, device=device) + (kv_len - q_len))[None].expand(batch, q_len)
    else:
        pos = newest_positions(ends.to(device), q_len)
    first = pos[:, :1]  # [B, 1]: this call's first token of each row
    row_start = torch.zeros(batch, 1, dtype=torch.long, device=device)
    if starts is not None:
        row_start = starts.to(device).long()[:, None]
    block_of = torch.div(pos - row_start, block, rounding_mode="floor")
    block_start = row_start + block_of * block
    anchor = torch.minimum(torch.maximum(block_start, first), pos)  # padding rows: themselves
    out = torch.gather(selected, 1, (anchor - first)[..., None].expand_as(selected))
    kept = state.method_state
    if kept.last_selection is not None and kept.last_selection.shape == out[:, -1].shape:
        # A block begun before this call (never at a prefill: no block starts before its first token).
        earlier = (block_of == kept.last_block.to(device)[:, None]) & (block_start < first) & (first > 0)
        out = torch.where(earlier[..., None], kept.last_selection[:, None].to(out.dtype), out)
    _keep_last(kept, block_of[:, -1], out[:, -1].detach())
    return out


def _keep_last(kept: MoHState, block: torch.Tensor, selection: torch.Tensor) -> None:
    """Store the newest token's block and selection for the next call: in place in the buffers of this batch shape,
    new buffers (outside any decode step: the first call of a shape is a prefill) otherwise."""
    same = (kept.last_selection is not None and kept.last_selection.shape == selection.shape
            and kept.last_selection.device == selection.device)
    if same:
        kept.last_block.copy_(block)
        kept.last_selection.copy_(selection)
        return
    kept.last_block, kept.last_selection = block.clone(), selection.clone()
    if not torch.compiler.is_compiling():  # a compiled step reads them in place (CUDA graphs: fixed addresses)
        torch._dynamo.mark_static_address(kept.last_block)
        torch._dynamo.mark_static_address(kept.last_selection)


def _balance_loss(probs, selected, rows, k: int) -> torch.Tensor:
    """The paper's ``N_r * sum_i P_i f_i`` over real tokens (f normalised by k: uniform routing gives 1)."""
    n_routed = probs.shape[-1]
    weight = torch.ones(probs.shape[:2], device=probs.device) if rows is None else rows.float()
    total = weight.sum().clamp_min(1.0)
    mean_prob = (probs * weight[..., None]).sum((0, 1)) / total
    share = (selected.float() * weight[..., None]).sum((0, 1)) / (total * max(k, 1))
    return n_routed * (mean_prob * share).sum()


def route(state, query, value, rows, starts, ends=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gates float ``[B, Tq, Hq]``, active bool ``[B, Tq, Hq]``) for this call; stores the balance loss.

    ``ends`` (a decode step given ``KeyBounds``): each row's tokens are the last of its real keys, not of the
    tensor (a static cache's empty slots follow them)."""
    config = state.config
    shard = state.context.shard
    if shard is not None:  # tensor parallelism: the top-k ranks all routed heads, so route on all ranks' heads.
        # Only each head's query norm is needed: gathered as [B, H, Tq, 1], whose norm over the last dim is itself.
        query = shard.gather(query.float().norm(dim=-1, keepdim=True), 1)
        if config.router == "learned":  # the learned router reads every KV head's values
            value = shard.gather(value, 1)
    batch, heads, q_len, _ = query.shape
    plan = state.method_state
    shared, routed, k = plan.shared.to(query.device), plan.routed.to(query.device), plan.top_k
    logits = norm_logits(query, routed)
    if config.router == "learned":
        features = router_features(value, q_len, ends)
        logits = logits + features @ state.router_weight.t() + state.router_bias
    probs = torch.softmax(logits, dim=-1)
    selected = torch.zeros_like(probs, dtype=torch.bool)
    if k > 0:
        selected.scatter_(-1, logits.topk(k, dim=-1).indices, True)
    if config.route_block > 1:
        selected = _anchored(selected, state, value.shape[2], starts, ends)
    if torch.is_grad_enabled() or not torch.compiler.is_compiling():  # an inference step keeps none of its outputs
        plan.balance_loss = _balance_loss(probs, selected, rows, k)

    if config.router == "norm":
        routed_gates = selected.float()
        shared_gates = torch.ones(batch, q_len, len(shared), device=query.device)
    else:
        kept = probs * selected
        routed_gates = kept / kept.sum(-1, keepdim=True).clamp_min(1e-9) * k
        shared_gates = torch.softmax(features @ state.shared_weight.t(), dim=-1) * len(shared)
        balance = 2 * torch.softmax(features @ state.type_weight.t(), dim=-1)
        shared_gates, routed_gates = shared_gates * balance[..., :1], routed_gates * balance[..., 1:]
    gates = query.new_zeros(batch, q_len, heads, dtype=torch.float32)
    gates = gates.index_copy(2, shared, shared_gates).index_copy(2, routed, routed_gates)
    active = torch.ones(batch, q_len, heads, dtype=torch.bool, device=query.device)
    active[..., routed] = selected
    if shard is not None:
        return shard.local(gates, 2), shard.local(active, 2)
    return gates, active


def _record(state, active, rows) -> None:
    """Density over the real tokens and the tile skip (static shapes, no host read; not from a compiled step, whose
    tensors its next replay overwrites)."""
    if torch.compiler.is_compiling():
        return
    batch, q_len, heads = active.shape
    if rows is None:
        density = active.float().mean()
    else:  # the mean over real tokens, as a masked sum (no data-dependent shape)
        real = rows.float().sum() * heads
        summed = (active & rows[..., None]).float().sum()
        density = torch.where(real > 0, summed / real.clamp_min(1.0), torch.ones_like(real))
    tiles = -(-q_len // KERNEL_TILE)
    padded = torch.nn.functional.pad(active, (0, 0, 0, tiles * KERNEL_TILE - q_len))
    tile_any = padded.view(batch, tiles, KERNEL_TILE, heads).any(2)
    state.record(density=density, tile_skip=1.0 - tile_any.float().mean())


# ---- attention -------------------------------------------------------------------------------------------------
def _all_active_binary(state) -> bool:
    plan = state.method_state
    return state.config.router == "norm" and plan.top_k == len(plan.routed)


@register_method(
    "moh",
    config=MoHConfig,
    category="moh",
    families=("llm", "lvlm", "dit"),
    patterns=("causal-self", "noncausal-self", "noncausal-cross"),
    make_state=make_moh_state,
    state_cls=MoHState,
    paper="Jin et al., MoH: Multi-Head Attention as Mixture-of-Head Attention (ICML 2025), arXiv 2410.11842",
    key_bounds=True,
)
def moh_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, key_bounds=None,
                  **kwargs):
    """Mixture-of-Head attention: shared heads always on, top-k routed heads per token, gated head outputs."""
    state = module.patchattn
    config = state.config
    if _all_active_binary(state):
        state.record(density=1.0, tile_skip=0.0)
        return dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if state.role == "dit":
        return _dit_moh(state, query, key, value, attention_mask, scaling, dropout, kwargs)
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    ends = None
    kernel_ok = not kwargs.get("sliding_window") and kwargs.get("softcap") is None
    if key_bounds is not None:  # a decode step: each row's real keys, read on the device
        starts, ends = key_bounds.starts, key_bounds.ends
        rows = (ends > starts)[:, None]  # the query is a real token unless the row has none
    else:
        try:
            starts = padding_start(attention_mask, batch, kv_len)
            rows = valid_rows(attention_mask, batch, q_len, kv_len, query.device)
        except ValueError as err:
            starts, rows, kernel_ok = None, None, False
            warnings.warn(f"patchattn moh: {err}; gates applied after dense attention (nothing skipped)",
                          stacklevel=2)
    gates, active = route(state, query, value, rows, starts, ends)
    _record(state, active, rows)
    if kernel_ok and use_fused_kernel(config.backend, query):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = fused_moh(query, key, value, gates, active, scaling=scale, kv_start=starts, kv_end=ends,
                        backend=config.backend, binary=config.router == "norm")
        return out.transpose(1, 2), None
    out, _ = dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return out * gates[..., None].to(out.dtype), None


def _dit_moh(state, query, key, value, attention_mask, scaling, dropout, kwargs):
    """A DiT call: heads routed per image/text token of self and joint attention (the MoH paper's DiT setting);
    cross-attention stays dense (its keys are text only).  Tokens are in the model's order (raster order for
    ``route_block``); a key-padding mask (HunyuanVideo's text) keeps the gated SDPA path."""
    if kwargs.get("cross_attention"):
        state.record(density=1.0, tile_skip=0.0)
        return dense_sdpa(query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                          enable_gqa=kwargs.get("enable_gqa", False)), None
    gates, active = route(state, query, value, None, None)
    _record(state, active, None)
    if attention_mask is None and dropout == 0.0 and use_fused_kernel(state.config.backend, query):
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        out = full_noncausal_attention(query, key, value, scaling=scale, backend=state.config.backend,
                                       head_gain=None if state.config.router == "norm" else gates, active=active)
        return out.transpose(1, 2), None
    out = dense_sdpa(query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                     enable_gqa=kwargs.get("enable_gqa", False))
    return out * gates[..., None].to(out.dtype), None


def fused_moh(query, key, value, gates, active, *, scaling, kv_start=None, kv_end=None, backend="auto",
              binary=False):
    """The kernel call of ``moh``: ``[B, Hq, Tq, D]``; inactive (token, head) pairs are skipped / zero.

    Binary gates (the norm router) equal ``active``, so no gain is passed: the kernel's gain path costs ~15%
    (measured on the H200, bench/moh/RESULTS.md).  ``kv_end`` (a decode step given ``KeyBounds``, with
    ``kv_start``): each row's real keys, its query the newest.
    """
    return full_causal_attention(query, key, value, scaling=scaling, kv_start=kv_start, kv_end=kv_end,
                                 backend=backend, head_gain=None if binary else gates, active=active)


def aux_loss(model, *, scaled: bool = True) -> torch.Tensor:
    """Load-balance loss of the last forward: ``balance_coef * sum over layers of L_b`` (graph kept).

    ``scaled=False`` returns the plain sum.  Raises ValueError when no ``moh`` layer has run a forward yet.
    """
    losses, coef = [], 0.0
    for module in model.modules():
        state = get_state(module)
        if state is not None and isinstance(state.config, MoHConfig) and state.method_state.balance_loss is not None:
            losses.append(state.method_state.balance_loss)
            coef = state.config.balance_coef
    if not losses:
        raise ValueError("aux_loss: no moh-patched layer has run a forward yet (patch with 'moh' and call the model)")
    total = torch.stack([loss.to(losses[0].device) for loss in losses]).sum()
    return total * coef if scaled else total


def router_parameters(model) -> dict[str, nn.Parameter]:
    """The learned routers' parameters by name (all contain ``.patchattn.``)."""
    return {name: p for name, p in model.named_parameters() if ".patchattn." in name}
