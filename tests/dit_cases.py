"""Tiny random diffusers DiTs of every supported family, built from configs (no downloads), and the layout each
attention role must see.  Shared by the adapter tests and the DiT method tests (``from dit_cases import ...``)."""

from dataclasses import dataclass

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

BATCH = 2


# ----------------------------------------------------------------------------------------------------------------
# Tiny models, and what their layouts must be (grids deliberately non-square so a transposed grid fails)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    cls: str
    config: dict
    inputs: callable
    grid: tuple
    n_text: int
    joint_text_first: bool | None  # None: no joint attention
    roles: dict  # attention module attribute -> "joint" | "self" | "cross"


def _flux_inputs():
    h, w, n_text = 3, 4, 5
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
    return dict(hidden_states=torch.randn(BATCH, h * w, 4), encoder_hidden_states=torch.randn(BATCH, n_text, 32),
                pooled_projections=torch.randn(BATCH, 32), timestep=torch.rand(BATCH), img_ids=ids.reshape(-1, 3),
                txt_ids=torch.zeros(n_text, 3))


CASES = {
    "flux": Case(
        "FluxTransformer2DModel",
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
        _flux_inputs, (1, 3, 4), 5, True, {"attn": "joint"},
    ),
    "sd3": Case(
        "SD3Transformer2DModel",
        dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
             pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
        lambda: dict(hidden_states=torch.randn(BATCH, 4, 8, 6), encoder_hidden_states=torch.randn(BATCH, 5, 32),
                     pooled_projections=torch.randn(BATCH, 32), timestep=torch.rand(BATCH)),
        (1, 4, 3), 5, False, {"attn": "joint", "attn2": "self"},
    ),
    "cogvideox": Case(
        "CogVideoXTransformer3DModel",
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
             text_embed_dim=16, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
             temporal_compression_ratio=4, max_text_seq_length=6),
        lambda: dict(hidden_states=torch.randn(BATCH, 3, 4, 8, 6), encoder_hidden_states=torch.randn(BATCH, 6, 16),
                     timestep=torch.randint(0, 1000, (BATCH,))),
        (3, 4, 3), 6, True, {"attn1": "joint"},
    ),
    "wan": Case(
        "WanTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
             qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        lambda: dict(hidden_states=torch.randn(BATCH, 4, 2, 8, 6), encoder_hidden_states=torch.randn(BATCH, 5, 16),
                     timestep=torch.randint(0, 1000, (BATCH,))),
        (2, 4, 3), 5, None, {"attn1": "self", "attn2": "cross"},
    ),
    "pixart": Case(
        "PixArtTransformer2DModel",
        dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
             caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
             activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
             norm_elementwise_affine=False, norm_eps=1e-6),
        # A caption padding mask, so the cross-attention mask path is exercised too.
        lambda: dict(hidden_states=torch.randn(BATCH, 4, 8, 6), encoder_hidden_states=torch.randn(BATCH, 5, 32),
                     timestep=torch.randint(0, 1000, (BATCH,)), encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0],
                     [1, 1, 1, 1, 1]]), added_cond_kwargs={"resolution": None, "aspect_ratio": None}),
        (1, 4, 3), 5, None, {"attn1": "self", "attn2": "cross"},
    ),
    "hunyuan_video": Case(
        "HunyuanVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
             num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
             pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), guidance_embeds=False),
        # [video; text] with a text padding mask (the refiner, text-only attention, is left unpatched)
        lambda: dict(hidden_states=torch.randn(BATCH, 4, 3, 8, 6), encoder_hidden_states=torch.randn(BATCH, 5, 16),
                     timestep=torch.randint(0, 1000, (BATCH,)), pooled_projections=torch.randn(BATCH, 8),
                     encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])),
        (3, 4, 3), 5, False, {"attn": "joint"},
    ),
    "ltx_video": Case(
        "LTXVideoTransformer3DModel",
        dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
             cross_attention_dim=16, num_layers=2, caption_channels=16),
        # packed latent [B, F*H*W, C]; the grid comes from the num_frames/height/width arguments
        lambda: dict(hidden_states=torch.randn(BATCH, 2 * 4 * 3, 4), encoder_hidden_states=torch.randn(BATCH, 5, 16),
                     timestep=torch.randint(0, 1000, (BATCH,)), encoder_attention_mask=torch.ones(BATCH, 5),
                     num_frames=2, height=4, width=3),
        (2, 4, 3), 5, None, {"attn1": "self", "attn2": "cross"},
    ),
}
FAMILIES = list(CASES)


def tiny(family):
    torch.manual_seed(0)
    case = CASES[family]
    model = getattr(diffusers, case.cls)(**case.config).eval()
    return model, case.inputs()


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def expected_layout(case: Case, role: str):
    """(text_slices, image_slice) the method must see for a module of this role."""
    n_image = case.grid[0] * case.grid[1] * case.grid[2]
    if role != "joint":
        return (), (0, n_image)
    if case.joint_text_first:
        return ((0, case.n_text),), (case.n_text, case.n_text + n_image)
    return ((n_image, n_image + case.n_text),), (0, n_image)
