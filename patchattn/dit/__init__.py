"""DiT helpers that sit beside the api: they run patched transformers, never the reverse (no method, adapter or api
module imports this package).  ``guidance``: perturbed-attention guidance with a ``softpag``-patched transformer."""

from .guidance import SoftPAGGuidance, guided_noise, perturbation, set_perturbed_heads, softpag_states

__all__ = ["SoftPAGGuidance", "guided_noise", "perturbation", "set_perturbed_heads", "softpag_states"]
