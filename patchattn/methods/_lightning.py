"""Shared code of ``lightning`` and ``hybrid``: a softmax attention layer converted to Lightning Attention-2.

What a converted layer computes (query heads ``h``, the layer's q/k/v after RoPE, as transformers hands them over):

1. **Feature map** ``phi`` on q and k (``feature_map``):
   ``"hedgehog"`` (default, LoLCATs' learnable map: ``phi(x) = [softmax(x W), softmax(-x W)]`` over the feature
   axis, ``W`` one ``D x D`` matrix per query head for q and per kv head for k, initialised to the identity; 2D
   features), ``"elu"`` (``elu(x) + 1``, parameter-free) or ``"silu"`` (TransNormerLLM's ``SiLU`` on q and k).
2. **Decayed causal linear attention** (``patchattn.kernels.lightning``): ``o_t = sum_{j<=t} lambda_h^(t-j)
   (phi(q_t) . phi(k_j)) v_j`` with ``lambda_h = exp(-s_h)``; ``decay="tnl"`` (default) is TransNormerLLM's
   schedule, the ALiBi slopes ``s_h`` times ``1 - l/(L-1) + 1e-5`` for layer ``l`` of ``L``; ``"alibi"`` the slopes
   alone (Lightning Attention-2's README), ``"none"`` no decay.  Tiled: intra-block masked quadratic part + an
   inter-block recurrent state (Triton forward on CUDA; chunked torch elsewhere).
3. **Normalisation** (``normalize``): ``"sum"`` (default, what LoLCATs keeps so a converted layer starts close to a
   softmax layer: ``o_t / (phi(q_t) . sum_j lambda^(t-j) phi(k_j))``, the denominator computed by the same kernel
   through a column of ones appended to v), ``"rms"`` (TransNormerLLM's: an RMSNorm over the layer's heads with a
   learnable weight) or ``"none"``.
4. **Output gate** (``output_gate``): TransNormerLLM's low-rank gate ``sigmoid(U W x)``, here ``2 sigmoid(U W v)``
   read from the token's value vectors (the attention function does not see ``x``; ``v = x W_v`` is a RoPE-free
   linear function of it), with ``U`` zero-initialised so the gate starts at exactly 1.

New parameters live on the module's ``PatchState`` (``...self_attn.patchattn.feature_q`` etc.), so the trainer
trains them beside LoRA, saves them in ``patch_state.safetensors`` and ``patchattn.load(..., adapter=...)`` reloads
them.  Decoding: the recurrent state ``[B, H, F, E]`` after the last call is kept in the method state; a call whose
cache holds exactly the tokens seen so far (checked against the last key seen) continues from it in O(1) per
token, anything else rebuilds the state from the cached keys (O(T), same result).  Left padding: padded keys get
``phi(k) = 0`` (and v = 0), so a padded row equals the row alone (the decay depends only on distances).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MethodConfig, option
from ..kernels.hedgehog import hedgehog_features
from ..kernels.lightning import alibi_slopes, lightning_attention
from ..state import MethodState, PatchState, get_state
from ._heads import head_counts
from ._sparse import dense_call, padding_start

FEATURE_MAPS = ("hedgehog", "elu", "silu")
NORMALIZERS = ("sum", "rms", "none")
DECAYS = ("tnl", "alibi", "none")
LIGHTNING_PAPER = ("Qin et al., Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large "
                   "Language Models, arXiv 2401.04658 (+ TransNormerLLM, arXiv 2307.14995; conversion: LoLCATs, "
                   "arXiv 2410.10254)")


@dataclass(kw_only=True)
class LightningConfig(MethodConfig):
    feature_map: str = option("hedgehog", "feature map on q and k: 'hedgehog' (LoLCATs' learnable softmax map, "
                              "identity init), 'elu' (elu+1), 'silu' (TransNormerLLM)", choices=FEATURE_MAPS)
    normalize: str = option("sum", "'sum': linear-attention denominator (LoLCATs); 'rms': TransNormerLLM's "
                            "RMSNorm over heads (learnable weight); 'none'", choices=NORMALIZERS)
    decay: str = option("tnl", "per-head decay: 'tnl' (ALiBi slopes scaled by 1 - l/(L-1) + 1e-5, TransNormerLLM), "
                        "'alibi' (slopes alone), 'none'", choices=DECAYS)
    output_gate: bool = option(True, "TransNormerLLM's low-rank sigmoid output gate (starts at exactly 1)")
    gate_rank: int = option(16, "rank of the output gate", min=1)
    block_size: int = option(64, "tile of the intra-block quadratic part (Lightning's BLOCK)", min=16, max=256)
    transfer_coef: float = option(0.0, "attention transfer: a training forward keeps each layer's q/k/v so that "
                                  "transfer_loss() can compare it with the softmax teacher (0: off)", min=0.0)
    init_std: float = option(1e-2, "std of the output gate's down projection at patch time", min=0.0)
    seed: int = option(0, "seed of the output gate's initialisation", min=0)

    def validate(self) -> None:
        if self.feature_map == "silu" and self.normalize == "sum":
            raise ValueError(f"{self.where('normalize')} = 'sum' needs non-negative features (a denominator that "
                             f"can reach 0 with SiLU's negative values); use normalize='rms' (TransNormerLLM's "
                             f"pairing) or feature_map 'hedgehog' / 'elu'")


@dataclass
class LightningState(MethodState):
    """The layer's decay slopes ``[Hq]`` (fixed at patch time) and, for decoding, the recurrent state after the last
    call (``kv [B, Hq, F, E]`` float32), how many tokens it covers and the last key it saw ``[B, Hkv, D]`` (to
    recognise the same cache); ``transfer`` the attention-transfer MSE of the latest training forward (computed
    from its detached q/k/v, see ``transfer_mse``) while ``transfer_on`` (``end_transfer`` turns it off once the
    transfer stage is over).  ``softmax`` marks a hybrid's softmax layer."""

    DEVICE_FIELDS: ClassVar[tuple[str, ...]] = ("slopes",)

    slopes: torch.Tensor | None = None
    softmax: bool = False
    kv: torch.Tensor | None = None
    tokens: int = 0
    last_key: torch.Tensor | None = None
    transfer: torch.Tensor | None = None
    transfer_on: bool = True
    carry: LinearCarry | None = None  # published by a bounded cache for its next call (``take_carry``)


@dataclass
class LinearCarry:
    """What a bounded cache (``patchattn.bounded_cache``) hands a linear layer instead of its past keys: the
    recurrent state ``kv`` after the ``past`` tokens before this call (None before the first call) and ``store``,
    which the layer calls with its state after this call.  The call's ``key``/``value`` are then its own tokens
    only, and the attention mask still spans ``past + q_len`` keys (it is shared with full softmax layers)."""

    past: int
    kv: torch.Tensor | None
    store: Callable[[torch.Tensor], None]


def publish_carry(method_state: LightningState, carry: LinearCarry) -> None:
    method_state.carry = carry


def take_carry(method_state: LightningState) -> LinearCarry | None:
    """This call's carry (cleared: a later call without the bounded cache sees none), or None."""
    carry = method_state.carry
    method_state.carry = None
    return carry


# ---- patch time ------------------------------------------------------------------------------------------------
def layer_count(module) -> int | None:
    config = getattr(module, "config", None)
    return getattr(config, "num_hidden_layers", None)


def decay_slopes(config: LightningConfig, heads: int, layer: int, layers: int | None) -> torch.Tensor:
    """``[heads]`` float32 slopes ``s_h`` (decay ``exp(-s_h)`` per token)."""
    if config.decay == "none":
        return torch.zeros(heads)
    slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float32)
    if config.decay == "tnl":
        scale = 1.0 - layer / (layers - 1) + 1e-5 if layers and layers > 1 else 1.0
        slopes = slopes * scale
    return slopes


def make_lightning_state(module, config: LightningConfig, layer_index, role, context, softmax=False) -> PatchState:
    """The slopes and the conversion parameters (feature maps, norm weight, gate) of one layer."""
    heads, kv_heads, head_dim = head_counts(module)
    plan = LightningState(slopes=decay_slopes(config, heads, layer_index, layer_count(module)), softmax=softmax)
    state = PatchState(config, layer_index, role, context, plan)
    if softmax:
        return state
    param = next(module.parameters())
    device = param.device
    if config.feature_map == "hedgehog":
        eye = torch.eye(head_dim, device=device)
        state.feature_q = nn.Parameter(eye.repeat(heads, 1, 1))
        state.feature_k = nn.Parameter(eye.repeat(kv_heads, 1, 1))
    if config.normalize == "rms":
        state.norm_weight = nn.Parameter(torch.ones(heads * head_dim, device=device))
    if config.output_gate:
        gen = torch.Generator().manual_seed(config.seed * 100_003 + layer_index)
        down = torch.randn(config.gate_rank, kv_heads * head_dim, generator=gen) * config.init_std
        state.gate_down = nn.Parameter(down.to(device))
        state.gate_up = nn.Parameter(torch.zeros(heads * head_dim, config.gate_rank, device=device))
    return state


# ---- the converted layer ---------------------------------------------------------------------------------------
def feature_map(state, x: torch.Tensor, which: str, dtype=torch.float32) -> torch.Tensor:
    """``phi(x)`` ``[B, H, T, F]`` in ``dtype`` for ``x [B, H, T, D]`` (``which``: ``"q"`` or ``"k"``); computed in
    float32 (hedgehog: the fused kernel of ``kernels/hedgehog`` where no gradient is needed)."""
    kind = state.config.feature_map
    if kind == "hedgehog":
        return hedgehog_features(x, getattr(state, f"feature_{which}"), backend=state.config.backend,
                                 out_dtype=dtype)
    x = x.float()
    return (F.elu(x) + 1.0 if kind == "elu" else F.silu(x)).to(dtype)


def key_validity(attention_mask, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """bool ``[B, Tk]``: keys that are real tokens (not padding); None when nothing is padded.

    From the padding spans of a causal + padding mask; for any other mask (a sliding-window layer's) from its
    diagonal -- a real query sees its own key -- for this call's keys, and earlier (cached) keys are taken as real
    (their padding was zeroed in the state when they were new)."""
    try:
        start = padding_start(attention_mask, batch, kv_len)
    except ValueError:
        start = _diagonal(attention_mask, batch, q_len, kv_len, device)
        return start
    if start is None:
        return None
    return torch.arange(kv_len, device=device)[None, :] >= start.to(device).long()[:, None]


def _diagonal(attention_mask, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    rows = torch.arange(q_len, device=attention_mask.device)
    diag = attention_mask[:, 0, rows, rows + (kv_len - q_len)]  # [B or 1, Tq]
    seen = diag if diag.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
    past = torch.ones(seen.shape[0], kv_len - q_len, dtype=torch.bool, device=seen.device)
    return torch.cat([past, seen], dim=1).expand(batch, kv_len).to(device)


def _expand(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _same_cache(kept: LightningState, key: torch.Tensor, past: int) -> bool:
    """Whether the kept state covers exactly the cache's first ``past`` keys (same rows, same last key)."""
    if kept.kv is None or kept.tokens != past or kept.last_key is None or kept.kv.shape[0] != key.shape[0]:
        return False
    return kept.last_key.shape == key[:, :, past - 1].shape and torch.equal(kept.last_key, key[:, :, past - 1])


def linear_layer(module, query, key, value, attention_mask, *, scaling=None, **kwargs) -> torch.Tensor:
    """The converted layer's output ``[B, Tq, Hq, D]`` (before ``o_proj``), updating the decode state; a training
    forward with ``transfer_coef > 0`` also computes the layer's attention-transfer MSE (``transfer_mse``)."""
    state = module.patchattn
    transfer = state.config.transfer_coef > 0 and state.method_state.transfer_on
    if transfer and module.training and torch.is_grad_enabled():
        state.method_state.transfer = transfer_mse(module, query.detach(), key.detach(), value.detach(),
                                                   attention_mask, scaling=scaling, **kwargs)
    carry = take_carry(state.method_state)
    return _linear_output(module, query, key, value, attention_mask, keep_state=not module.training, carry=carry)


def transfer_mse(module, query, key, value, attention_mask, *, scaling=None, **kwargs) -> torch.Tensor:
    """LoLCATs' layer-wise attention transfer for one converted layer: the MSE between its linear-attention output
    and the softmax teacher's on the layer's DETACHED q/k/v, so that the gradient reaches this layer's own
    conversion parameters only.

    The first version took the MSE on the layer's output as passed on: then layer ``l``'s MSE back-propagated
    through the residual stream into every earlier layer's feature maps and gates against a detached teacher, and
    the stage lowered the MSE by reshaping the stream the later layers see instead of matching each layer's
    attention: on SmolLM2 the summed MSE fell while held-out perplexity rose (issue 23, design note 42).  It is
    computed inside the forward, where FSDP2 holds the layer's parameters unsharded (a recomputation after the
    forward would meet sharded parameters); its graph is separate from the output's, so the LM gradients are the
    same with and without ``transfer_coef``."""
    student = _linear_output(module, query, key, value, attention_mask, keep_state=False)
    with torch.no_grad():
        teacher, _ = dense_call(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    return (student.float() - teacher.float()).pow(2).mean()


def _linear_output(module, query, key, value, attention_mask, *, keep_state: bool,
                   carry: LinearCarry | None = None) -> torch.Tensor:
    state = module.patchattn
    config, kept = state.config, state.method_state
    batch, heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    if carry is not None:  # a bounded cache: ``key`` holds this call's tokens only, the state the ones before
        valid = key_validity(attention_mask, batch, q_len, carry.past + kv_len, query.device)
        valid = None if valid is None else valid[:, carry.past:]
        past, reuse, start = 0, True, 0
    else:
        past = kv_len - q_len
        valid = key_validity(attention_mask, batch, q_len, kv_len, query.device)
        # Continuing the kept state reads only this call's keys (O(1) per decoded token); a rebuild reads them all.
        reuse = past > 0 and _same_cache(kept, key, past)
        start = past if reuse else 0
        if valid is not None:
            valid = valid[:, start:]

    # Features and values in the model's dtype: the kernel's products run in it (16-bit: tensor cores; features are
    # probabilities in [0, 1]), its sums, state and output in float32 (float32 inputs ran its float32 path, 30x
    # slower than SDPA on an H100: bench/linear/RESULTS.md).
    phi_k = feature_map(state, key[:, :, start:], "k", query.dtype)
    v = value[:, :, start:]
    if valid is not None:  # padded keys contribute nothing (phi(k) = 0), so a padded row equals the row alone
        phi_k = phi_k * valid[:, None, :, None]
        v = v * valid[:, None, :, None]
    if config.normalize == "sum":
        v = torch.cat([v, torch.ones_like(v[..., :1]) * (valid[:, None, :, None] if valid is not None else 1.0)], -1)
    slopes = kept.slopes.to(query.device)

    initial, new = None, past - start  # ``new``: where this call's keys start in phi_k / v
    if carry is not None:
        initial = carry.kv
    elif reuse:
        initial = kept.kv
    elif past > 0:  # rebuild the state of the cached keys (another cache, e.g. a reordered beam)
        _, initial = lightning_attention(
            phi_k.new_zeros(batch, heads, past, phi_k.shape[-1]), phi_k[:, :, :past], v[:, :, :past], slopes,
            block=config.block_size, backend=config.backend)
    phi_q = feature_map(state, query, "q", query.dtype)
    out, final = lightning_attention(phi_q, phi_k[:, :, new:], v[:, :, new:], slopes, initial,
                                     block=config.block_size, backend=config.backend, out_dtype=torch.float32,
                                     normalize_last=config.normalize == "sum")
    if carry is not None:
        carry.store(final.detach())
    elif keep_state:  # training calls have no cache to continue
        kept.kv, kept.tokens, kept.last_key = final.detach(), kv_len, key[:, :, -1].detach().clone()
    out = out.transpose(1, 2)  # [B, Tq, Hq, D]
    if config.normalize == "rms":
        flat = out.flatten(2)
        flat = flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + 1e-6) * state.norm_weight.float()
        out = flat.view_as(out)
    if config.output_gate:
        features = value[:, :, past:].float().permute(0, 2, 1, 3).flatten(2)  # [B, Tq, Hkv*D]
        gate = 2 * torch.sigmoid(features @ state.gate_down.float().t() @ state.gate_up.float().t())
        out = out * gate.view(batch, q_len, heads, head_dim)
    return out.to(query.dtype)


def softmax_layer(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, window=None, **kwargs):
    """A hybrid's softmax layer: the model's own attention, or causal sliding-window attention of ``window`` keys
    (each query sees itself and the ``window - 1`` keys before it; the model's mask, padding included, still
    applies)."""
    if window is None:
        return dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    qpos = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    kpos = torch.arange(kv_len, device=query.device)[None, :]
    band = (kpos <= qpos) & (qpos - kpos < window)
    if attention_mask is None:
        mask = band[None, None]
    elif attention_mask.dtype == torch.bool:
        mask = attention_mask[..., :kv_len] & band
    else:
        mask = attention_mask[..., :kv_len].masked_fill(~band, float("-inf"))
    groups = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(query, _expand(key, groups), _expand(value, groups), attn_mask=mask,
                                         dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _linear_layers(model):
    """``(module, state)`` of every lightning/hybrid layer of ``model``."""
    for module in model.modules():
        state = get_state(module)
        if isinstance(getattr(state, "method_state", None), LightningState):
            yield module, state


def end_transfer(model) -> int:
    """End the attention-transfer stage: training forwards stop computing each layer's transfer MSE (one linear pass
    and one softmax teacher per converted layer that only ``transfer_loss`` reads) and drop the last one kept.  The
    trainer calls it when a recipe's ``aux_only_steps`` are over; returns the layers switched off."""
    switched = 0
    for _, state in _linear_layers(model):
        state.method_state.transfer_on, state.method_state.transfer = False, None
        switched += 1
    return switched


def _transfer_layers(model):
    """``(module, state)`` of the converted layers that kept a training forward's transfer MSE."""
    return ((module, state) for module, state in _linear_layers(model) if state.method_state.transfer is not None)


def layer_transfer_losses(model) -> dict[int, torch.Tensor]:
    """``{layer index: transfer MSE}`` of the last training forward (``transfer_mse``: each with gradients into its
    own layer's conversion parameters only)."""
    return {state.layer_index: state.method_state.transfer for _, state in _transfer_layers(model)}


def transfer_loss(model, *, scaled: bool = True) -> torch.Tensor:
    """Attention-transfer loss of the last training forward (LoLCATs' stage 1): the mean over converted layers of
    the MSE between each layer's linear-attention output and its softmax teacher on the same q/k/v, times
    ``transfer_coef`` (``scaled=False``: the plain mean).  Needs ``transfer_coef > 0``; ValueError when no layer has
    run a training forward yet."""
    layers = list(_transfer_layers(model))
    if not layers:
        raise ValueError("transfer_loss: no lightning/hybrid layer has computed an attention-transfer loss (patch "
                         "with transfer_coef > 0 and run a forward in training mode)")
    losses = [state.method_state.transfer for _, state in layers]
    total = torch.stack([loss.to(losses[0].device) for loss in losses]).mean()
    return total * layers[-1][1].config.transfer_coef if scaled else total


def conversion_parameters(model) -> dict[str, nn.Parameter]:
    """The converted layers' own parameters by name (all contain ``.patchattn.``)."""
    return {name: p for name, p in model.named_parameters() if ".patchattn." in name}
