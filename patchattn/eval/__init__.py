"""Evaluation: perplexity and generation on offline text, and lm-eval tasks on patched models (``evaluate``)."""

from .harness import evaluate
from .ppl import mean_stat, offline_text, perplexity, text_token_ids

__all__ = ["evaluate", "mean_stat", "offline_text", "perplexity", "text_token_ids"]
