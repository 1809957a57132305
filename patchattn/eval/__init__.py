"""Evaluation: perplexity and generation on offline text (lm-eval integration comes with its own module)."""

from .ppl import mean_stat, offline_text, perplexity, text_token_ids

__all__ = ["mean_stat", "offline_text", "perplexity", "text_token_ids"]
