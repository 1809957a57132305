"""Tiny random diffusers DiTs of every supported family, built from configs (no downloads), and the layout each
attention role must see.  Shared by the adapter tests and the DiT method tests (``from dit_cases import ...``)."""

from dataclasses import dataclass

import pytest
import torch

from patchattn.dit_models import TINY_DITS

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
        TINY_DITS["flux"].cls, TINY_DITS["flux"].config,
        _flux_inputs, (1, 3, 4), 5, True, {"attn": "joint"},
    ),
    "sd3": Case(
        TINY_DITS["sd3"].cls, TINY_DITS["sd3"].config,
        lambda: dict(hidden_states=torch.randn(BATCH, 4, 8, 6), encoder_hidden_states=torch.randn(BATCH, 5, 32),
                     pooled_projections=torch.randn(BATCH, 32), timestep=torch.rand(BATCH)),
        (1, 4, 3), 5, False, {"attn": "joint", "attn2": "self"},
    ),
    "cogvideox": Case(
        TINY_DITS["cogvideox"].cls, TINY_DITS["cogvideox"].config,
        lambda: dict(hidden_states=torch.randn(BATCH, 3, 4, 8, 6), encoder_hidden_states=torch.randn(BATCH, 6, 16),
                     timestep=torch.randint(0, 1000, (BATCH,))),
        (3, 4, 3), 6, True, {"attn1": "joint"},
    ),
    "wan": Case(
        TINY_DITS["wan"].cls, TINY_DITS["wan"].config,
        lambda: dict(hidden_states=torch.randn(BATCH, 4, 2, 8, 6), encoder_hidden_states=torch.randn(BATCH, 5, 16),
                     timestep=torch.randint(0, 1000, (BATCH,))),
        (2, 4, 3), 5, None, {"attn1": "self", "attn2": "cross"},
    ),
    "pixart": Case(
        TINY_DITS["pixart"].cls, TINY_DITS["pixart"].config,
        # A caption padding mask, so the cross-attention mask path is exercised too.
        lambda: dict(hidden_states=torch.randn(BATCH, 4, 8, 6), encoder_hidden_states=torch.randn(BATCH, 5, 32),
                     timestep=torch.randint(0, 1000, (BATCH,)), encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0],
                     [1, 1, 1, 1, 1]]), added_cond_kwargs={"resolution": None, "aspect_ratio": None}),
        (1, 4, 3), 5, None, {"attn1": "self", "attn2": "cross"},
    ),
    "hunyuan_video": Case(
        TINY_DITS["hunyuan_video"].cls, TINY_DITS["hunyuan_video"].config,
        # [video; text] with a text padding mask (the refiner, text-only attention, is left unpatched)
        lambda: dict(hidden_states=torch.randn(BATCH, 4, 3, 8, 6), encoder_hidden_states=torch.randn(BATCH, 5, 16),
                     timestep=torch.randint(0, 1000, (BATCH,)), pooled_projections=torch.randn(BATCH, 8),
                     encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])),
        (3, 4, 3), 5, False, {"attn": "joint"},
    ),
    "ltx_video": Case(
        TINY_DITS["ltx_video"].cls, TINY_DITS["ltx_video"].config,
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


def spans(grid, n_text: int, text_first):
    """(image span, text spans) of a call with ``grid`` image tokens and ``n_text`` text tokens before
    (``text_first``) or after them."""
    n_image = grid[0] * grid[1] * grid[2]
    if not n_text:
        return (0, n_image), ()
    if text_first:
        return (n_text, n_text + n_image), ((0, n_text),)
    return (0, n_image), ((n_image, n_image + n_text),)


def pooled_mask(mask: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Each token pair takes its block pair's verdict: visible iff any token pair of the two blocks is
    (``blocks[i]``: the block or tile of token i), by brute force over the visible token pairs."""
    n_blocks = int(blocks.max()) + 1
    any_seen = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    for i, j in mask.nonzero().tolist():
        any_seen[blocks[i], blocks[j]] = True
    return any_seen[blocks][:, blocks]


def dit_module(config, grid, image, text) -> torch.nn.Module:
    """A bare module carrying a DiT patch state for one call on ``grid`` with ``image`` / ``text`` spans."""
    from patchattn.state import PatchContext, PatchState, TokenLayout

    layout = TokenLayout(text_slices=text, grid=grid, image_slice=image)
    module = torch.nn.Module()
    module.patchattn = PatchState(config, 0, "dit", PatchContext(family="test", kind="dit", layout=layout))
    return module


def call_against_sdpa(method: str, module, length: int, allowed_of, *, batch=2, heads=2, dim=16, scaling=0.3):
    """One ``method`` call on ``module`` and SDPA with the mask ``allowed_of(module)`` (bool ``[T, T]``, read after
    the call, when the plan exists) on the same random q/k/v: ((out, dq, dk, dv) of the method, the same of SDPA,
    the mask)."""
    from patchattn.methods._dit import dense_sdpa
    from patchattn.registry import get_spec

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen).requires_grad_() for _ in range(3))
    out, _ = get_spec(method).forward(module, q, k, v, None, scaling=scaling)
    allowed = allowed_of(module)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    expected = dense_sdpa(qr, kr, vr, allowed, scaling=scaling)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    return (out, q.grad, k.grad, v.grad), (expected, qr.grad, kr.grad, vr.grad), allowed
