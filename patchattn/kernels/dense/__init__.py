"""Dense attention: the oracle every other method is compared against."""

from .reference import eager_attention, sdpa_attention

__all__ = ["eager_attention", "sdpa_attention"]
