"""blocktopk on DiTs (BiFormer-style tile routing, non-causal): one call against a brute-force routing oracle written
from the definition (tiles from grid coordinates, mean-pooled scores, own tile + top_k), forward and backward, torch
and Triton; whole tiny DiTs against the oracle, the dense-equivalent setting and unpatch on every family."""

import math
import warnings
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("diffusers")

from dit_cases import CASES, FAMILIES, run, tiny

import patchattn
from patchattn.methods._dit import dense_sdpa, dit_call
from patchattn.methods._dit_routing import covering_plan
from patchattn.methods.blocktopk import BlockTopKConfig
from patchattn.registry import get_spec
from patchattn.state import PatchContext, PatchState, TokenLayout

BLOCK = 16


def _module(config, grid, image, text):
    layout = TokenLayout(text_slices=text, grid=grid, image_slice=image)
    module = torch.nn.Module()
    module.patchattn = PatchState(config, 0, "dit", PatchContext(family="test", kind="dit", layout=layout))
    return module


def _layout(grid, n_text, text_first):
    n_image = math.prod(grid)
    if not n_text:
        return (0, n_image), ()
    if text_first:
        return (n_text, n_text + n_image), ((0, n_text),)
    return (0, n_image), ((n_image, n_image + n_text),)


def routing_mask(query, key, grid, image, text, tile, top_k, scale):
    """bool ``[B, H, T, T]`` from the definition: tiles of ``tile`` tokens per axis (row-major grid coordinates),
    tile score = pooled q . pooled k * scale + log(tokens in the key tile), own tile + best top_k, text all."""
    b, h, t, _ = query.shape
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
    n_tiles = [math.ceil(g / s) for g, s in zip(grid, tile)]
    cell = coords // torch.tensor(tile)
    tile_of = (cell[:, 0] * n_tiles[1] + cell[:, 1]) * n_tiles[2] + cell[:, 2]
    n = math.prod(n_tiles)
    member = torch.nn.functional.one_hot(tile_of, n).float()  # [N_image, n]
    counts = member.sum(0)
    img = slice(*image)
    qm = torch.einsum("bhid,in->bhnd", query[:, :, img].float(), member) / counts.clamp(min=1)[:, None]
    km = torch.einsum("bhid,in->bhnd", key[:, :, img].float(), member) / counts.clamp(min=1)[:, None]
    scores = qm @ km.transpose(-1, -2) * scale + counts.clamp(min=1).log()
    keep = torch.zeros(b, h, n, n, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                keep[bi, hi, i, i] = True
                others = [j for j in scores[bi, hi, i].argsort(descending=True).tolist() if j != i and counts[j] > 0]
                for j in others[:top_k]:
                    keep[bi, hi, i, j] = True
    mask = torch.ones(b, h, t, t, dtype=torch.bool)
    mask[:, :, img, img] = keep[:, :, tile_of][:, :, :, tile_of]
    return mask


def _run_call(grid, n_text, text_first, top_k, *, backend="torch", heads=2, batch=2, dim=16):
    image, text = _layout(grid, n_text, text_first)
    length = math.prod(grid) + n_text
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen).requires_grad_() for _ in range(3))
    config = BlockTopKConfig(top_k=top_k, mass=1.0, block_size=BLOCK, backend=backend)
    module = _module(config, grid, image, text)
    out, _ = get_spec("blocktopk").forward(module, q, k, v, None, scaling=0.3)
    tile = covering_plan(grid, BLOCK, image, text, "cpu").tile
    mask = routing_mask(q.detach(), k.detach(), grid, image, text, tile, top_k, 0.3)
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
    expected = dense_sdpa(qr, kr, vr, mask, scaling=0.3)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    return (out, q.grad, k.grad, v.grad), (expected, qr.grad, kr.grad, vr.grad), module


CALLS = [
    ((1, 8, 8), 0, None, 1),
    ((1, 6, 10), 5, True, 2),
    ((3, 5, 6), 7, False, 1),  # 3D, grid padding (partial tiles), text last
    ((2, 7, 9), 4, True, 0),  # only the own tile
]


@pytest.mark.parametrize("grid, n_text, text_first, top_k", CALLS)
def test_call_matches_the_routing_oracle(grid, n_text, text_first, top_k):
    got, expected, module = _run_call(grid, n_text, text_first, top_k)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    assert 0 < module.patchattn.stats["density"] < 1


def test_call_triton_interpreter(triton_interpreter):
    got, expected, _ = _run_call((3, 5, 6), 7, False, 1, backend="triton")
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-3)


def test_zero_mass_reads_the_own_tile_only():
    grid, n_text = (1, 8, 8), 3
    image, text = _layout(grid, n_text, True)
    q, k, v = (torch.randn(1, 2, 67, 16) for _ in range(3))
    outs = []
    for settings in ({"top_k": 3, "mass": 0.0}, {"top_k": 0, "mass": 1.0}):
        module = _module(BlockTopKConfig(block_size=BLOCK, backend="torch", **settings), grid, image, text)
        outs.append(get_spec("blocktopk").forward(module, q, k, v, None)[0])
    torch.testing.assert_close(outs[0], outs[1])


# ---- whole tiny DiTs -------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class OracleConfig(BlockTopKConfig):
    """blocktopk's settings (mass 1), run as dense SDPA under the brute-force routing mask."""


@patchattn.register_method("test_blocktopk_oracle", config=OracleConfig, category="other", families=("dit",),
                           patterns=("noncausal-self", "noncausal-cross"), paper="test oracle")
def blocktopk_oracle(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, is_causal=False,
                     cross_attention=False, enable_gqa=False, **kwargs):
    state = module.patchattn
    call = dit_call(state, query, cross_attention)
    mask = attention_mask
    if call.role != "cross":
        tile = covering_plan(call.grid, state.config.block_size, call.image, call.text, "cpu").tile
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        mask = routing_mask(query, key, call.grid, call.image, call.text, tile, state.config.top_k, scale)
        if attention_mask is not None:  # HunyuanVideo's padded text stays hidden
            mask = mask & (attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1e4)
    return dense_sdpa(query, key, value, mask, scaling=scaling, dropout=dropout, enable_gqa=enable_gqa), None


def _larger(family):
    """A tiny DiT with a latent grid of several 16-token tiles (the shared cases' grids fit in one)."""
    model, inputs = tiny(family)
    torch.manual_seed(1)
    if family == "wan":
        inputs["hidden_states"] = torch.randn(2, 4, 2, 16, 12)  # grid (2, 8, 6)
    elif family == "hunyuan_video":
        inputs["hidden_states"] = torch.randn(2, 4, 3, 12, 10)  # grid (3, 6, 5)
    return model, inputs


SPARSE = {"top_k": 1, "mass": 1.0, "block_size": BLOCK, "backend": "torch"}


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_tiny_dit_matches_the_oracle(family):
    model, inputs = _larger(family)
    with patchattn.patched(model, "test_blocktopk_oracle", **SPARSE):
        expected = run(model, inputs)
    with patchattn.patched(model, "blocktopk", **SPARSE):
        got = run(model, inputs)
        states = [m.patchattn for m in model.modules() if isinstance(getattr(m, "patchattn", None), PatchState)]
        densities = [s.stats["density"] for s in states]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert min(densities) < 0.8
    assert ("cross" in CASES[family].roles.values()) == (max(densities) == 1.0)  # cross attention stays dense


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_equivalent_reproduces_dense_and_unpatch_is_exact(family):
    model, inputs = tiny(family)
    reference = run(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with patchattn.patched(model, "blocktopk", **BlockTopKConfig.DENSE_EQUIVALENT):
            assert torch.equal(run(model, inputs), reference)
        with patchattn.patched(model, "blocktopk", density=1.0):
            assert torch.equal(run(model, inputs), reference)
    with patchattn.patched(model, "blocktopk", **SPARSE):
        run(model, inputs)  # every family runs the routed path (one tile here: the own tile is everything)
    assert torch.equal(run(model, inputs), reference)


def test_density_knob_reads_that_share_of_the_tiles():
    model, inputs = _larger("wan")
    reference = run(model, inputs)
    with patchattn.patched(model, "blocktopk", density=0.5, block_size=BLOCK, backend="torch"):
        out = run(model, inputs)
        states = [m.patchattn for m in model.modules() if isinstance(getattr(m, "patchattn", None), PatchState)]
        self_densities = [s.stats["density"] for s in states if s.stats["density"] < 1.0]
    assert not torch.equal(out, reference)
    assert self_densities and all(0.3 < d <= 0.6 for d in self_densities)


def test_cfg_batch_rows_are_routed_alone():
    model, inputs = _larger("wan")
    with patchattn.patched(model, "blocktopk", **SPARSE):
        both = run(model, inputs)
        for row in range(2):
            alone = {k: (v[row:row + 1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v)
                     for k, v in inputs.items()}
            torch.testing.assert_close(run(model, alone), both[row:row + 1], atol=1e-5, rtol=1e-4)


def test_schedule_fields_apply_on_dits():
    model, inputs = _larger("wan")
    reference = run(model, inputs)
    with patchattn.patched(model, "blocktopk", dense_first_steps=1, **SPARSE):
        assert torch.equal(run(model, inputs), reference)  # step 0: the warm-up step
        assert not torch.equal(run(model, dict(inputs, timestep=inputs["timestep"] // 2)), reference)
