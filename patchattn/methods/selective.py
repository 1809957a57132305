"""``selective`` — Selective Self-Attention (SSA): query- and position-dependent inverse temperature, value temperature.

Zhang, Chang, Li, Roy-Chowdhury, Chen, Oymak, "Selective Attention: Enhancing Transformer through Principled
Context Control" (NeurIPS 2024), arXiv 2411.12892; released code ``umich-sota/selective_attention`` (lit-gpt fork).

Softmax ``softmax(K q)`` becomes ``softmax(tau_q(x_i, i) * K q)`` and values ``v_j`` become ``tau_v(x_j) * v_j``:

* **position temperature** (the released code): ``s_i = 1 + exp(-exp(beta)) * log(n_i)`` with ``n_i`` the keys query
  ``i`` sees (its position + 1, counted from the row's first real token) and one learnable scalar ``beta`` per layer
  (init 2.0, the fine-tune setting); ``position="linear"`` is the code's other variant ``1 + beta * log(n_i)``
  (init 0: exactly dense at step 0); ``"none"`` drops it;
* **token temperature** (the paper's ``tau(x)``): ``tanh(u_h . f_i + b_h)`` added to ``s_i`` per query head ``h``,
  where ``f_i`` is the token's value vectors (``token_input="value"``, default) or the head's own query
  (``"query"``).  The paper's ``tau`` reads the token embedding ``x``; the attention function sees q/k/v only, and
  its q is after RoPE, so ``u . q`` would rotate with the absolute position (and meet unseen angles past the tuned
  length); ``v = x W_v`` is the RoPE-free linear function of ``x`` at hand (as moh's learned router).  ``u, b``
  start at 0, so the term starts at exactly 0.  Since ``s_i >= 1`` and ``tanh > -1`` the inverse temperature
  stays positive (``position="linear"`` with a negative ``beta`` can break that; the user's choice);
* **value temperature**: ``tau_v = 1 + tanh(w_g . v_j + c_g)`` per KV head ``g`` (in ``(0, 2)``: can silence noisy
  tokens), ``w, c`` start at 0 (exactly 1).

**How it runs.**  A per-query factor on the logits is the same as scaling the query, and a per-key factor on the
values is the same as scaling the value: ``q_i <- tau_q(i) q_i``, ``v_j <- tau_v(j) v_j``, then the model's own
attention (SDPA / FlashAttention on a GPU: the fused path, with its masks, GQA, soft-cap and cache) runs unchanged.
This is exact up to rounding the scaled q/v back to the model's dtype.  ``tau_v`` is a function of the cached
``v_j`` itself, so KV-cached decoding sees the same values as a full forward; ``n_i`` comes from the mask (or the
causal offset when there is none), so padded rows and decode steps count positions as a row alone would; a
static-cache decode step (``KeyBounds``) reads everything on the device, so it compiles whole.

**Trainable state.**  ``beta``, ``u, b`` and ``w, c`` are ``nn.Parameter`` s on each layer's ``PatchState``
(``...self_attn.patchattn.position_beta`` etc.); the trainer trains every ``.patchattn.`` parameter with the LoRA and
saves them in ``patch_state.safetensors``; ``patchattn.load(..., adapter=...)`` reloads them (as moh's router).
``H*Hkv*D + H + Hkv*D + Hkv + 1`` parameters per layer (Llama-3-8B: 34K of 218M per layer, 0.016%).  ``selective_reference``
is the eager oracle (materialised softmax of the scaled logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import MethodConfig, option
from ..registry import register_method
from ..state import PatchState
from ._heads import dense_call, head_counts, newest_values

POSITIONS = ("exp", "linear", "none")
TOKEN_INPUTS = ("query", "value")
PAPER = ("Zhang et al., Selective Attention: Enhancing Transformer through Principled Context Control "
         "(NeurIPS 2024), arXiv 2411.12892")


@dataclass(kw_only=True)
class SelectiveConfig(MethodConfig):
    position: str = option("exp", "position temperature: 'exp' 1+exp(-exp(beta))*log n (released code), 'linear' "
                           "1+beta*log n, 'none'", choices=POSITIONS)
    beta_init: float | None = option(None, "initial beta (None: 2.0 for 'exp', the fine-tune code's; 0.0 for "
                                     "'linear')")
    query_temperature: bool = option(True, "token-dependent query temperature tanh(u.f + b) (paper's tau(x))")
    token_input: str = option("value", "what the token temperature reads: 'value' (the token's value vectors: a "
                              "RoPE-free linear map of x) or 'query' (each head's own query, after RoPE)",
                              choices=TOKEN_INPUTS)
    value_temperature: bool = option(True, "value temperature 1 + tanh(w.v + c) per KV head")

    # No position term, no token or value temperature: the model's own attention, whatever the parameters.
    DENSE_EQUIVALENT: ClassVar[dict] = {"position": "none", "query_temperature": False, "value_temperature": False}

    def initial_beta(self) -> float:
        if self.beta_init is not None:
            return self.beta_init
        return 2.0 if self.position == "exp" else 0.0


def make_selective_state(module, config: SelectiveConfig, layer_index, role, context) -> PatchState:
    """The layer's temperature parameters: token / value parts start at exactly 0 (temperature 1)."""
    heads, kv_heads, head_dim = head_counts(module)
    device = next(module.parameters()).device
    state = PatchState(config, layer_index, role, context)
    if config.position != "none":
        state.position_beta = nn.Parameter(torch.full((1,), config.initial_beta(), device=device))
    if config.query_temperature:
        features = head_dim if config.token_input == "query" else kv_heads * head_dim
        state.query_weight = nn.Parameter(torch.zeros(heads, features, device=device))
        state.query_bias = nn.Parameter(torch.zeros(heads, device=device))
    if config.value_temperature:
        state.value_weight = nn.Parameter(torch.zeros(kv_heads, head_dim, device=device))
        state.value_bias = nn.Parameter(torch.zeros(kv_heads, device=device))
    return state


# ---- temperatures ----------------------------------------------------------------------------------------------
def visible_keys(attention_mask, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """float ``[B, Tq]``: how many keys each query sees (>= 1), from the mask or, with none, the causal offset."""
    if attention_mask is None:
        n = torch.arange(q_len, device=device, dtype=torch.float32) + (kv_len - q_len + 1)
        return n[None].expand(batch, q_len)
    mask = attention_mask[:, 0] if attention_mask.dim() == 4 else attention_mask
    seen = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    n = seen[..., -q_len:, :].sum(-1).float().expand(batch, q_len)
    return n.clamp_min(1.0)


def position_scale(state, n: torch.Tensor) -> torch.Tensor | None:
    """``[B, Tq]`` position inverse temperature ``1 + lambda * log n`` (None without a position term)."""
    config = state.config
    if config.position == "none":
        return None
    beta = state.position_beta.float()
    lam = torch.exp(-torch.exp(beta)) if config.position == "exp" else beta
    return 1.0 + lam * torch.log(n.to(beta.device))


def query_temperature(state, query: torch.Tensor, value: torch.Tensor, n: torch.Tensor,
                      ends: torch.Tensor | None = None) -> torch.Tensor | None:
    """``[B, Hq, Tq]`` float inverse temperature of each query (None when it is identically 1).  ``ends``
    (``KeyBounds.ends`` of a static-cache decode step): the queries' own values end there, not at the tensor's end."""
    config = state.config
    pos = position_scale(state, n)
    if not config.query_temperature:
        return None if pos is None else pos[:, None, :]
    if config.token_input == "query":
        token = torch.einsum("bhtd,hd->bht", query.float(), state.query_weight.float())
    else:
        q_len = query.shape[2]
        own = value[:, :, -q_len:] if ends is None else newest_values(value, ends, q_len)
        feats = own.float().permute(0, 2, 1, 3).flatten(2)  # [B, Tq, Hkv * D]
        token = (feats @ state.query_weight.float().t()).transpose(1, 2)
    token = torch.tanh(token + state.query_bias.float()[None, :, None])
    return token + (1.0 if pos is None else pos[:, None, :])


def value_temperature(state, value: torch.Tensor) -> torch.Tensor | None:
    """``[B, Hkv, Tk]`` float value temperature of each key (None when off)."""
    if not state.config.value_temperature:
        return None
    logits = torch.einsum("bgtd,gd->bgt", value.float(), state.value_weight.float())
    return 1.0 + torch.tanh(logits + state.value_bias.float()[None, :, None])


def scaled_inputs(state, query, value, attention_mask, ends=None):
    """(query, value) with the temperatures folded in, in the inputs' dtypes (device ops only: no host read)."""
    batch, _, q_len, _ = query.shape
    n = visible_keys(attention_mask, batch, q_len, value.shape[2], query.device)
    tau_q = query_temperature(state, query, value, n, ends)
    tau_v = value_temperature(state, value)
    if tau_q is not None:
        query = (query.float() * tau_q[..., None]).to(query.dtype)
    if tau_v is not None:
        value = (value.float() * tau_v[..., None]).to(value.dtype)
    return query, value


@register_method(
    "selective",
    config=SelectiveConfig,
    category="other",
    families=("llm", "lvlm"),
    needs_finetune=True,
    patterns=("causal-self",),
    make_state=make_selective_state,
    paper=PAPER,
    key_bounds=True,
)
def selective_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, key_bounds=None,
                        **kwargs):
    """Selective attention: learned query/position inverse temperature and value temperature (q, v rescaled)."""
    state = module.patchattn
    ends = None if key_bounds is None else key_bounds.ends
    query, value = scaled_inputs(state, query, value, attention_mask, ends)
    state.record(density=1.0)
    return dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


# ---- reference -------------------------------------------------------------------------------------------------
def selective_reference(query, key, value, valid, *, scale, beta=None, position="exp", query_weight=None,
                        query_bias=None, token_input="query", value_weight=None, value_bias=None):
    """Eager SSA in float64: ``softmax(tau_q * q.k * scale over valid keys) @ (tau_v * v)``, ``[B, Hq, Tq, D]``.

    ``valid`` bool ``[B, Tq, Tk]``: the keys each query sees; ``n_i`` is its row count.  Rows seeing nothing give 0.
    """
    q, k, v = (t.double() for t in (query, key, value))
    heads, kv_heads = q.shape[1], k.shape[1]
    n = valid.sum(-1).clamp_min(1).double()  # [B, Tq]
    tau = torch.ones_like(n)[:, None].expand(-1, heads, -1).clone()
    if position != "none":
        b = float(beta.detach()) if torch.is_tensor(beta) else float(beta)
        lam = math.exp(-math.exp(b)) if position == "exp" else b
        tau = tau + lam * torch.log(n)[:, None]
    if query_weight is not None:
        if token_input == "query":
            t = torch.einsum("bhtd,hd->bht", q, query_weight.double())
        else:
            feats = v[:, :, -q.shape[2]:].permute(0, 2, 1, 3).flatten(2)
            t = torch.einsum("btf,hf->bht", feats, query_weight.double())
        tau = tau + torch.tanh(t + query_bias.double()[None, :, None])
    if value_weight is not None:
        tv = 1 + torch.tanh(torch.einsum("bgtd,gd->bgt", v, value_weight.double()) + value_bias.double()[None, :, None])
        v = v * tv[..., None]
    group = heads // kv_heads
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    logits = (q @ k.transpose(-1, -2)) * scale * tau[..., None]
    logits = logits.masked_fill(~valid[:, None], float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num(0.0)
    return probs @ v
