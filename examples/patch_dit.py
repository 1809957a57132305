"""Patch a diffusers DiT: a tiny random FLUX transformer, patched with ``dense``, gives the same output.

Runs offline on CPU in a few seconds (``pip install -e '.[dit]'`` from the repository):

    python examples/patch_dit.py

With a real pipeline it is the same one line: ``patchattn.patch(pipe, "dense")`` patches ``pipe.transformer``.
"""

import torch
from diffusers import FluxTransformer2DModel

import patchattn


def tiny_flux() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()


def flux_inputs(height=3, width=4, n_text=5, batch=2) -> dict:
    """FLUX takes packed latents: one token per latent patch, located by (frame, row, column) ids."""
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(height)[:, None], torch.arange(width)[None]
    return dict(
        hidden_states=torch.randn(batch, height * width, 4),
        encoder_hidden_states=torch.randn(batch, n_text, 32),
        pooled_projections=torch.randn(batch, 32),
        timestep=torch.rand(batch),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=torch.zeros(n_text, 3),
    )


def main():
    torch.manual_seed(0)
    model, inputs = tiny_flux(), flux_inputs()
    with torch.no_grad():
        reference = model(**inputs).sample

    handle = patchattn.patch(model, "dense")
    print(handle.summary())
    layouts = []
    # Peek at what a method sees: the layout is set just before each attention call.
    peek = model.transformer_blocks[0].attn.register_forward_hook(
        lambda module, args, out: layouts.append(module.patchattn.context.layout)
    )
    with torch.no_grad():
        patched = model(**inputs).sample
    peek.remove()
    print(f"max abs diff dense vs unpatched: {(patched - reference).abs().max().item():.3g}")
    print(f"layout seen by the joint attention: {layouts[0]}")

    patchattn.unpatch(model)
    with torch.no_grad():
        print("unpatched output bit-identical:", torch.equal(model(**inputs).sample, reference))


if __name__ == "__main__":
    main()
