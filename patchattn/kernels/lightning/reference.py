"""Pure-torch decayed causal linear attention (Lightning Attention-2): the naive O(T^2) oracle and the chunked path.

Shapes: ``q, k [B, H, T, F]`` (features after the feature map), ``v [B, H, T, E]``, ``slopes [H]`` (the decay
``lambda_h = exp(-slope_h)``), ``state [B, H, F, E]`` float32.  Definition (one head)::

    S_0 = state (zeros when None)      S_{t+1} = lambda * S_t + k_t^T v_t      o_t = q_t S_{t+1}

i.e. ``o_t = sum_{j<=t} lambda^(t-j) (q_t . k_j) v_j + lambda^(t+1) q_t S_0``.  Both functions return
``(o [B, H, T, E] in ``out_dtype`` (default v's dtype), final state [B, H, F, E] float32)``; all sums are in
float32.
"""
from __future__ import annotations

import torch


def _decays(slopes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``[H, *offsets.shape]`` = lambda^offset (offsets >= 0)."""
    return torch.exp(-slopes.float().view(-1, *([1] * offsets.dim())) * offsets.float())


def naive_linear_attention(q, k, v, slopes, state=None, out_dtype=None):
    """The quadratic oracle: ``((q k^T) * D) v`` with ``D[t, j] = lambda^(t-j)`` for ``j <= t`` else 0."""
    t = q.shape[2]
    pos = torch.arange(t, device=q.device)
    diff = pos[:, None] - pos[None, :]
    mask = _decays(slopes, diff.clamp(min=0)) * (diff >= 0)  # [H, T, T]
    scores = torch.einsum("bhtf,bhjf->bhtj", q.float(), k.float()) * mask[None]
    out = scores @ v.float()
    last = _decays(slopes, torch.tensor(t - 1, device=q.device) - pos)  # [H, T]: lambda^(T-1-j)
    final = torch.einsum("bhjf,bhje->bhfe", k.float() * last[None, :, :, None], v.float())
    if state is not None:
        out = out + (q.float() @ state.float()) * _decays(slopes, pos + 1)[None, :, :, None]
        final = final + state.float() * _decays(slopes, torch.tensor(t, device=q.device))[None, :, None, None]
    return out.to(out_dtype or v.dtype), final


def chunked_linear_attention(q, k, v, slopes, state=None, block: int = 64, out_dtype=None):
    """Lightning Attention-2's tiling in torch: per block, the masked decayed quadratic part inside the block plus
    the recurrent state's contribution, then the state update ``S <- lambda^c S + (K * lambda^(c-1-idx))^T V``.
    Differentiable (autograd through the loop); O(T block F) work and O(F E) state per head."""
    batch, heads, t, f = q.shape
    e = v.shape[-1]
    s = state.float() if state is not None else q.new_zeros(batch, heads, f, e, dtype=torch.float32)
    idx = torch.arange(block, device=q.device)
    diff = idx[:, None] - idx[None, :]
    intra = _decays(slopes, diff.clamp(min=0)) * (diff >= 0)  # [H, block, block]
    q_decay = _decays(slopes, idx + 1)[None, :, :, None]  # [1, H, block, 1]: lambda^(row+1)
    outs = []
    for start in range(0, t, block):
        c = min(block, t - start)
        qi, ki, vi = (x[:, :, start:start + c].float() for x in (q, k, v))
        local = (qi @ ki.transpose(-1, -2)) * intra[None, :, :c, :c]
        outs.append(local @ vi + (qi @ s) * q_decay[:, :, :c])
        k_decay = _decays(slopes, (c - 1) - idx[:c])[None, :, :, None]
        s = s * _decays(slopes, torch.tensor(c, device=q.device))[None, :, None, None] + (ki * k_decay).transpose(-1, -2) @ vi
    out = torch.cat(outs, dim=2) if outs else v.float()[:, :, :0]
    return out.to(out_dtype or v.dtype), s


def recurrent_step(q, k, v, slopes, state):
    """One token per row at a time (decode): ``S <- lambda S + k^T v; o = q S``, for ``T`` tokens in a loop."""
    s = state.float()
    lam = _decays(slopes, torch.tensor(1, device=q.device))[None, :, None, None]
    outs = []
    for i in range(q.shape[2]):
        s = s * lam + k[:, :, i].float()[..., :, None] * v[:, :, i].float()[..., None, :]
        outs.append(q[:, :, i, None].float() @ s)
    return torch.cat(outs, dim=2).to(v.dtype), s
