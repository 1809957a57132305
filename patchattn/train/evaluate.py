"""Held-out perplexity: whole chunks in one forward, token by token against the KV cache, or with the training
attention (S²-Attn / SF-Attn) switched on to see what the approximation costs."""

from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm

from ..state import get_state


def _bar(iterable, desc: str | None, unit: str, total: int | None = None):
    """A transient progress bar named ``desc``; none when ``desc`` is None (tests, --no-progress)."""
    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=desc is None, leave=False, dynamic_ncols=True)


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss; labels -100 (image tokens) are not counted."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum",
                                             ignore_index=-100)


@torch.no_grad()
def heldout_loss(model, chunks: torch.Tensor, desc: str | None = None, inputs_of=None) -> float:
    """Mean next-token loss over the held-out chunks ``[n, T]`` (one chunk per forward); ``inputs_of(ids, i)`` gives
    a chunk's forward kwargs with ``labels`` (images attached), default the ids alone."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i, row in enumerate(_bar(chunks, desc, "chunk")):
        inputs = {"input_ids": row[None], "labels": row[None]} if inputs_of is None else inputs_of(row[None], i)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        labels = inputs.pop("labels")
        total += float(_nll(model(**inputs).logits, labels))
        count += int((labels[:, 1:] != -100).sum())
    return total / count


@contextlib.contextmanager
def training_attention(model):
    """Put only the patched attention modules in training mode (dropout stays off): the training attention runs."""
    modules = [m for m in model.modules() if get_state(m) is not None]
    previous = [m.training for m in modules]
    for m in modules:
        m.training = True
    try:
        yield
    finally:
        for m, was in zip(modules, previous, strict=True):
            m.training = was


@torch.no_grad()
def decode_loss(model, stream: torch.Tensor, prefill: int, tokens: int, desc: str | None = None) -> float:
    """Mean loss of predicting ``tokens`` tokens one at a time after a ``prefill``-token prompt (KV cache in use)."""
    if len(stream) < prefill + tokens + 1:
        raise ValueError(f"decode evaluation needs {prefill + tokens + 1} held-out tokens, the text has {len(stream)}")
    device = next(model.parameters()).device
    ids = stream[: prefill + tokens + 1][None].to(device)
    out = model(input_ids=ids[:, :prefill], use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    total = 0.0
    for t in _bar(range(prefill, prefill + tokens), desc, "token"):
        total += float(torch.nn.functional.cross_entropy(logits.float(), ids[:, t]))
        out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return total / tokens


def ppl(loss: float) -> float:
    return math.exp(loss)
