"""Patch a (tiny, random) LLaVA's language backbone, its vision tower, or both; show where the image tokens are.

    python examples/patch_lvlm.py
"""

import torch

import patchattn
from patchattn.testing import max_abs_diff, tiny_inputs, tiny_model

model = tiny_model("llava")
inputs = tiny_inputs(model, "llava")
with torch.no_grad():
    reference = model(**inputs).logits
for targets in ("text", "vision", "all"):
    with patchattn.patched(model, "dense", targets=targets) as handle:
        with torch.no_grad():
            out = model(**inputs).logits
        layout = model.get_submodule(handle.modules[0]).patchattn.context.layout
        print(f"targets={targets}: {len(handle.modules)} modules, max |diff| vs unpatched "
              f"{max_abs_diff(out, reference):.1e}, image tokens per sample "
              f"{layout.image_token_mask.sum(-1).tolist()}")
