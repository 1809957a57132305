"""Shared drivers of the decode tests: token-by-token decoding through the default cache, and one decode step
through a static cache compiled with ``fullgraph=True``.  Each returns logits for the test to compare; the
comparison (and its tolerance) stays in the test."""

import copy

import torch
from transformers import StaticCache


def decoded_rows(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits ``[B, T - prefill + 1, V]`` at positions ``prefill - 1 .. T - 1``: a prefill of ``ids[:, :prefill]``
    (its last row), then one cached decode step per remaining token.  Compare with a full forward's
    ``logits[:, prefill - 1:]``."""
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefill], use_cache=True)
        cache, rows = out.past_key_values, [out.logits[:, -1]]
        for t in range(prefill, ids.shape[1]):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            rows.append(out.logits[:, -1])
    return torch.stack(rows, 1)


def static_decode_step(model, ids: torch.Tensor, mask: torch.Tensor, max_cache_len: int = 64):
    """One greedy decode step after a (left-padded) prefill of ``ids``/``mask``, three ways: (compiled with
    ``fullgraph=True`` through a ``StaticCache``, the same step eager through the static cache, the same step
    through the default dynamic cache).  The caller patches the model and resets dynamo."""
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        step_mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        step_pos = positions[:, -1:] + 1
        dynamic = model(input_ids=token, attention_mask=step_mask, position_ids=step_pos,
                        past_key_values=out.past_key_values, use_cache=True).logits
        cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)

        def step(x, c):
            return model(input_ids=x, attention_mask=step_mask, position_ids=step_pos, past_key_values=c,
                         cache_position=torch.tensor([ids.shape[1]]), use_cache=True).logits

        eager = step(token, copy.deepcopy(cache))
        compiled = torch.compile(step, fullgraph=True, backend="eager")(token, cache)
    return compiled, eager, dynamic
