"""Perplexity on offline text: ``pydoc_data`` ships with every CPython, so no download is ever needed."""

from __future__ import annotations

import math

import torch

from ..state import get_state


def offline_text(source: str = "pydoc") -> str:
    """Long English technical prose available offline: ``"pydoc"`` (CPython's pydoc topics, ~1 MB) or a file path."""
    if source == "pydoc":
        from pydoc_data import topics

        return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    with open(source, encoding="utf-8") as handle:
        return handle.read()


def text_token_ids(tokenizer, n_tokens: int, source: str = "pydoc", offset: int = 0) -> torch.Tensor:
    """``[1, n_tokens]`` token ids of the offline text starting at token ``offset``."""
    ids = tokenizer(offline_text(source), return_tensors="pt").input_ids
    if ids.shape[1] < offset + n_tokens:
        raise ValueError(f"the text has only {ids.shape[1]} tokens; asked for {n_tokens} from offset {offset}")
    return ids[:, offset : offset + n_tokens]


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor) -> float:
    """Perplexity of ``model`` on ``input_ids`` in one forward pass (every token predicts the next)."""
    logits = model(input_ids=input_ids.to(model.device)).logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1).to(logits.device)
    )
    return math.exp(nll.item())


def mean_stat(model, name: str) -> float | None:
    """Mean of a statistic (e.g. ``density``) that the patched modules reported on their latest call."""
    values = [s.stats[name] for s in (get_state(m) for m in model.modules()) if s is not None and name in s.stats]
    return sum(values) / len(values) if values else None
