"""Perplexity on offline text: ``pydoc_data`` ships with every CPython, so no download is ever needed."""

from __future__ import annotations

import math

import torch

from ..api import mean_stat
from ..data import offline_text, text_token_ids

__all__ = ["mean_stat", "offline_text", "perplexity", "text_token_ids"]  # the text helpers live in patchattn.data


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor) -> float:
    """Perplexity of ``model`` on ``input_ids`` in one forward pass (every token predicts the next)."""
    logits = model(input_ids=input_ids.to(model.device)).logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1).to(logits.device)
    )
    return math.exp(nll.item())
