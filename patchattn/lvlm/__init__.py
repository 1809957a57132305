"""LVLM pipelines built on a model's attention (api level: they take a loaded model and its processor).

- :func:`carve` -- CARVE, contrastive text->image attention to mask or crop the image, then re-ask.
"""

from .carve import CarveConfig, CarveResult, carve, contrast, fuse

__all__ = ["CarveConfig", "CarveResult", "carve", "contrast", "fuse"]
