"""``softplus`` — Softplus attention with length scale and re-weighting (LSSA / LSSAR), for length extrapolation.

Gao, Spratling (, Gionfrida), "Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language
Models", arXiv 2501.13428 (ICML 2026); code ``github.com/iminfine/freeatten`` (not in our mirror).

Softmax is read as a positive map (``exp``) followed by ``l1`` normalisation; the paper keeps the normalisation and
replaces the map:

1. **LSSA**: ``A_ij = softplus(c_i s_ij) / sum_{j' visible} softplus(c_i s_ij')`` over the causal keys, with
   ``s_ij = q_i . k_j * scaling`` (the model's own scaled logits; soft-capped where the model caps) and a
   length-dependent scale from entropy invariance.  ``scale="log_ratio"`` (default):
   ``c_i = max(min_scale, log n_i / log train_len)`` -- ``n_i`` the keys query ``i`` sees, ``train_len`` the length
   tuned at -- so the scale grows with ``log n`` past the training length; ``"log_d_log_n"``: the third-party
   reimplementation's ``c_i = log(d) log(n_i)`` on l2-normalised q and k (``qk_norm=True``); ``"none"``: ``c = 1``.
2. **Re-weighting (LSSAR)**: ``A~_ij ∝ ReLU(n_i A_ij - 1)^p`` renormalised (``p = 15``): only above-uniform weights
   survive, sharpened.  The first ``exempt_rows`` rows of each sequence (and any row whose weights are all exactly
   uniform, where the re-weighting is 0/0) keep ``A``.  Computed as ``(r / max r)^p`` for range.

``positive_map="exp"`` with ``scale="none"`` and ``reweight=False`` is softmax: the model's own attention, exactly
(``DENSE_EQUIVALENT``, the paper's decomposition baseline).

**How it runs.**  Pure torch, chunked over queries (``chunk`` rows at a time): each chunk materialises its
``[chunk, Tk]`` weights only, never ``T x T``; under autograd each chunk is recomputed in the backward
(``torch.utils.checkpoint``), so training memory stays ``O(chunk * T)`` per layer too.  The visible keys come from
the mask (causal, left/right padding, sliding windows, the KV cache of a decode step), so padded rows equal rows
alone and a decode step equals the full forward's row; a static-cache decode step (``KeyBounds``: empty slots
are hidden by the mask) reads everything on the device, so it compiles whole.  ``softplus_reference`` is the eager ``T x T`` oracle.
Needs training (the paper trains GPT-2 from scratch); the recipe is a LoRA adaptation of a pretrained model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import MethodConfig, option
from ..registry import register_method
from ._heads import dense_call

SCALES = ("log_ratio", "log_d_log_n", "none")
MAPS = ("softplus", "exp")
PAPER = ("Gao, Spratling, Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language "
         "Models (ICML 2026), arXiv 2501.13428")


@dataclass(kw_only=True)
class SoftplusConfig(MethodConfig):
    positive_map: str = option("softplus", "positive map before l1 normalisation ('exp' is softmax)", choices=MAPS)
    scale: str = option("log_ratio", "length scale c_i: 'log_ratio' log n/log train_len, 'log_d_log_n' log d*log n "
                        "(with qk_norm), 'none'", choices=SCALES)
    train_len: int = option(2048, "training length for scale='log_ratio' (the recipe's seq_len)", min=2)
    min_scale: float = option(0.0, "lower bound of the log_ratio scale (1.0: only lengths past train_len sharpen)",
                              min=0.0)
    qk_norm: bool = option(False, "l2-normalise q and k before the logits (the 3rd-party reimplementation)")
    reweight: bool = option(True, "LSSAR re-weighting ReLU(n A - 1)^p, renormalised")
    power: float = option(15.0, "re-weighting power p (paper: 15)", min=1.0)
    exempt_rows: int = option(1, "first rows of each sequence that keep the LSSA weights (no re-weighting)", min=0)
    chunk: int = option(256, "query rows per chunk (memory O(chunk * T))", min=1)

    DENSE_EQUIVALENT: ClassVar[dict] = {"positive_map": "exp", "scale": "none", "reweight": False, "qk_norm": False}

    def is_softmax(self) -> bool:
        return self.positive_map == "exp" and self.scale == "none" and not self.reweight and not self.qk_norm


# ---- masks -----------------------------------------------------------------------------------------------------
def visible(attention_mask, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """bool ``[B, Tq, Tk]``: the keys each query sees (causal with the queries last when there is no mask)."""
    if attention_mask is None:
        rows = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
        return (torch.arange(kv_len, device=device)[None] <= rows)[None].expand(batch, q_len, kv_len)
    mask = attention_mask[:, 0] if attention_mask.dim() == 4 else attention_mask
    seen = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return seen[..., -q_len:, -kv_len:].expand(batch, q_len, kv_len)


def row_positions(valid: torch.Tensor) -> torch.Tensor:
    """long ``[B, Tq]``: each query's position in its own sequence (its first visible key is 0)."""
    first = valid.int().argmax(-1)
    kv_len = valid.shape[-1]
    last = kv_len - 1 - valid.flip(-1).int().argmax(-1)
    return last - first


# ---- the weights -----------------------------------------------------------------------------------------------
def length_scale(config: SoftplusConfig, n: torch.Tensor, head_dim: int) -> torch.Tensor:
    """float ``[B, Tq]`` scale ``c_i`` from the visible-key counts ``n`` (>= 1)."""
    if config.scale == "none":
        return torch.ones_like(n)
    if config.scale == "log_d_log_n":
        return math.log(head_dim) * torch.log(n)
    return (torch.log(n) / math.log(config.train_len)).clamp_min(config.min_scale)


def attention_weights(config: SoftplusConfig, logits, valid, positions, head_dim: int) -> torch.Tensor:
    """``[B, H, C, Tk]`` float weights of a chunk: positive map, l1 normalisation, re-weighting; 0 off ``valid``.

    ``logits`` float ``[B, H, C, Tk]`` (already scaled), ``valid`` bool ``[B, C, Tk]``, ``positions`` ``[B, C]``.
    """
    valid = valid[:, None]
    n = valid.sum(-1, keepdim=True).float().clamp_min(1.0)  # [B, 1, C, 1]
    c = length_scale(config, n, head_dim)
    scaled = logits * c
    if config.positive_map == "exp":
        seen = valid.any(-1, keepdim=True)  # rows that see nothing (padding queries) get 0, not NaN
        scaled = scaled.masked_fill(~valid, float("-inf")).masked_fill(~seen, 0.0)
        weights = torch.softmax(scaled, -1) * seen
    else:
        positive = torch.where(valid, F.softplus(scaled), torch.zeros_like(scaled))
        weights = positive / positive.sum(-1, keepdim=True).clamp_min(torch.finfo(positive.dtype).tiny)
    if not config.reweight:
        return weights
    excess = F.relu(n * weights - 1.0) * valid
    top = excess.amax(-1, keepdim=True)
    sharp = (excess / top.clamp_min(torch.finfo(excess.dtype).tiny)) ** config.power
    sharp = sharp / sharp.sum(-1, keepdim=True).clamp_min(torch.finfo(sharp.dtype).tiny)
    keep = (top <= 0) | (positions[:, None, :, None] < config.exempt_rows)
    return torch.where(keep, weights, sharp)


def _chunk_attention(config, scale, softcap, q, k, v, valid, positions):
    """One chunk of rows: ``[B, H, C, D]`` float output."""
    logits = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    weights = attention_weights(config, logits, valid, positions, q.shape[-1])
    return weights @ v


def softplus_core(config: SoftplusConfig, query, key, value, valid, *, scale: float, softcap=None) -> torch.Tensor:
    """Chunked LSSA(R): ``[B, Hq, Tq, D]`` in the query's dtype; key/value ``[B, Hkv, Tk, D]`` (GQA expanded here)."""
    heads, q_len = query.shape[1:3]
    group = heads // key.shape[1]
    work = torch.promote_types(query.dtype, torch.float32)  # fp32 at least; float64 stays float64
    q, k, v = query.to(work), key.to(work), value.to(work)
    if config.qk_norm:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    positions = row_positions(valid)
    use_checkpoint = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    outs = []
    for lo in range(0, q_len, config.chunk):
        hi = min(q_len, lo + config.chunk)
        args = (config, scale, softcap, q[:, :, lo:hi], k, v, valid[:, lo:hi], positions[:, lo:hi])
        if use_checkpoint:
            outs.append(checkpoint(_chunk_attention, *args, use_reentrant=False))
        else:
            outs.append(_chunk_attention(*args))
    return torch.cat(outs, 2).to(query.dtype)


@register_method(
    "softplus",
    config=SoftplusConfig,
    category="other",
    families=("llm", "lvlm"),
    needs_finetune=True,
    patterns=("causal-self",),
    paper=PAPER,
    key_bounds=True,
)
def softplus_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, key_bounds=None,
                       **kwargs):
    """Softplus attention with a length scale and LSSAR re-weighting (l1-normalised, chunked over queries)."""
    state = module.patchattn
    config = state.config
    state.record(density=1.0)
    if config.is_softmax():
        return dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    batch, _, q_len, dim = query.shape
    scale = dim ** -0.5 if scaling is None else scaling
    if config.qk_norm:
        scale = 1.0  # cosine logits; the length scale carries the temperature
    valid = visible(attention_mask, batch, q_len, key.shape[2], query.device)
    out = softplus_core(config, query, key, value, valid, scale=scale, softcap=kwargs.get("softcap"))
    if dropout > 0.0 and module.training:
        out = F.dropout(out, p=dropout)
    return out.transpose(1, 2).contiguous(), None


# ---- reference -------------------------------------------------------------------------------------------------
def softplus_reference(query, key, value, valid, *, scale, train_len=2048, power=15.0, reweight=True,
                       exempt_rows=1, min_scale=0.0):
    """Eager LSSA(R) in float64 with the whole ``T x T`` matrix, row by row in plain loops over nothing clever.

    ``valid`` bool ``[B, Tq, Tk]``.  Scale ``log n / log train_len`` (``scale="log_ratio"``, no qk norm).
    """
    q, k, v = (t.double() for t in (query, key, value))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        seen_rows = [row for row in range(q.shape[2]) if valid[b, row].any()]
        first = [int(valid[b, row].nonzero()[0]) for row in seen_rows]
        for row, start in zip(seen_rows, first):
            cols = valid[b, row].nonzero()[:, 0]
            n = len(cols)
            position = int(cols[-1]) - start
            c = max(min_scale, math.log(n) / math.log(train_len))
            a = torch.log1p(torch.exp(c * s[b, :, row, cols]))  # softplus
            a = a / a.sum(-1, keepdim=True)
            if reweight and position >= exempt_rows:
                r = torch.clamp(n * a - 1, min=0) ** power
                total = r.sum(-1, keepdim=True)
                a = torch.where(total > 0, r / torch.where(total > 0, total, 1), a)
            out[b, :, row] = torch.einsum("hn,hnd->hd", a, v[b][:, cols])
    return out
