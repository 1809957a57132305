"""gna on DiTs: the method's output against SDPA with the brute-force neighborhood mask (forward and backward, torch
and Triton), the dense-equivalent setting on every tiny DiT family, unpatch, CFG batches, cross attention dense."""

import math
import warnings
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("diffusers")

from dit_cases import CASES, FAMILIES, run, spans, tiny

import patchattn
from patchattn.masks.neighborhood import neighborhood_token_mask, with_text
from patchattn.methods._dit import dense_sdpa, dit_call
from patchattn.methods.gna import GNAConfig, neighborhood_for
from patchattn.registry import get_spec
from patchattn.state import PatchContext, PatchState, TokenLayout


# ---- one attention call, against the brute-force mask ------------------------------------------------------------
def _module(config, grid, image, text):
    """A stand-in attention module whose patch state sees one call's layout."""
    layout = TokenLayout(text_slices=text, grid=grid, image_slice=image)
    module = torch.nn.Module()
    module.patchattn = PatchState(config, 0, "dit", PatchContext(family="test", kind="dit", layout=layout))
    return module


def _oracle_mask(config, grid, image, text, length):
    hood = neighborhood_for(config, grid)
    image_mask = neighborhood_token_mask(hood.grid, hood.window, hood.stride, hood.dilation, hood.causal)
    return with_text(image_mask, length, image, text)


CALLS = [
    # grid, text tokens, text first, settings
    ((1, 5, 7), 0, None, {"window": 3}),
    ((1, 6, 5), 4, True, {"window": [3, 4], "stride": [1, 2]}),
    ((1, 4, 9), 7, False, {"window": [4, 3], "stride": [2, 3], "dilation": [1, 2], "causal": [True, False]}),
    ((3, 4, 5), 0, None, {"window": [2, 3, 3], "stride": [1, 1, 3], "causal": [True, False, False]}),
    ((4, 3, 5), 5, True, {"window": [3, 2, 4], "stride": [3, 2, 2], "dilation": [1, 1, 2]}),
    ((1, 1, 21), 3, False, {"window": 5, "stride": 5}),  # a 1D sequence, blocked (HaloNet-style halo-free blocks)
    ((1, 16, 16), 0, None, {}),  # the default: the FLUX-4K setting scaled to the grid
]


def _run_call(config, grid, n_text, text_first, *, device="cpu", dtype=torch.float32, heads=2, batch=2, dim=16):
    image, text = spans(grid, n_text, text_first)
    length = math.prod(grid) + n_text
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen).to(device, dtype).requires_grad_()
               for _ in range(3))
    module = _module(config, grid, image, text)
    out, _ = get_spec("gna").forward(module, q, k, v, None, scaling=0.3)
    mask = _oracle_mask(config, grid, image, text, length).to(device)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    expected = dense_sdpa(qr, kr, vr, mask, scaling=0.3)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    return (out, q.grad, k.grad, v.grad), (expected, qr.grad, kr.grad, vr.grad), module


@pytest.mark.parametrize("grid, n_text, text_first, settings", CALLS)
def test_gna_equals_sdpa_with_the_neighborhood_mask(grid, n_text, text_first, settings):
    config = GNAConfig(backend="torch", tile_tokens=16, **settings)
    got, expected, module = _run_call(config, grid, n_text, text_first)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    density = module.patchattn.stats["density"]
    length = math.prod(grid) + n_text
    image, text = spans(grid, n_text, text_first)
    assert density == pytest.approx(_oracle_mask(config, grid, image, text, length).float().mean().item())
    assert density < 1.0


@pytest.mark.parametrize("case", [CALLS[2], CALLS[4]], ids=["2d-text-last", "3d-text-first"])
def test_gna_triton_interpreter(case, triton_interpreter):
    grid, n_text, text_first, settings = case
    config = GNAConfig(backend="triton", tile_tokens=16, **settings)
    got, expected, _ = _run_call(config, grid, n_text, text_first, batch=1, heads=1)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


# ---- settings -------------------------------------------------------------------------------------------------
def test_defaults_are_the_flux_4k_setting_scaled():
    hood = neighborhood_for(GNAConfig(), (1, 256, 256))
    assert hood.window[1:] == (80, 80) and hood.stride[1:] == (16, 16)
    hood = neighborhood_for(GNAConfig(), (1, 64, 64))  # FLUX 1024²
    assert hood.window[1:] == (20, 20) and hood.stride[1:] == (4, 4)
    assert not hood.covers_everything()
    explicit = neighborhood_for(GNAConfig(window=[7, 9]), (1, 64, 64))
    assert explicit.window == (1, 7, 9) and explicit.stride == (1, 1, 1)  # NATTEN's default stride


def test_per_axis_values_follow_the_grid():
    hood = neighborhood_for(GNAConfig(window=[3, 5, 7], causal=[True, False, False]), (4, 8, 8))
    assert hood.window == (3, 5, 7) and hood.causal == (True, False, False)
    with pytest.raises(ValueError, match="3D|one value, or 3"):
        neighborhood_for(GNAConfig(window=[5, 7]), (4, 8, 8))
    with pytest.raises(ValueError, match="stride"):
        neighborhood_for(GNAConfig(window=3, stride=4), (1, 8, 8))
    with pytest.raises(ValueError, match="at most 3"):
        GNAConfig(window=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="power of two"):
        GNAConfig(tile=[3, 8])


# ---- whole tiny DiTs -------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class OracleConfig(GNAConfig):
    """gna's settings, run as dense SDPA with the brute-force neighborhood mask."""


@patchattn.register_method("test_gna_oracle", config=OracleConfig, category="other", families=("dit",),
                           patterns=("noncausal-self", "noncausal-cross"), paper="test oracle")
def gna_oracle(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, is_causal=False,
               cross_attention=False, enable_gqa=False, **kwargs):
    """Dense SDPA under the token-by-token neighborhood mask and the model's key padding (cross attention dense)."""
    state = module.patchattn
    call = dit_call(state, query, cross_attention)
    mask = attention_mask
    if call.role != "cross":
        mask = _oracle_mask(state.config, call.grid, call.image, call.text, query.shape[2]).to(query.device)
        if attention_mask is not None:  # HunyuanVideo's padded text: hidden keys stay hidden
            visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1e4
            mask = mask & visible
    return dense_sdpa(query, key, value, mask, scaling=scaling, dropout=dropout, enable_gqa=enable_gqa), None


SMALL = {"window": 2, "stride": 1, "tile_tokens": 16, "backend": "torch"}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_dit_matches_the_oracle(family):
    model, inputs = tiny(family)
    with patchattn.patched(model, "test_gna_oracle", **SMALL):
        expected = run(model, inputs)
    with patchattn.patched(model, "gna", **SMALL):
        got = run(model, inputs)
        modules = [m for m in model.modules() if isinstance(getattr(m, "patchattn", None), PatchState)]
        densities = [m.patchattn.stats["density"] for m in modules]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    roles = CASES[family].roles
    assert any(d < 1.0 for d in densities)
    assert ("cross" in roles.values()) == any(d == 1.0 for d in densities)  # cross attention stays dense


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_equivalent_reproduces_dense_and_unpatch_is_exact(family):
    model, inputs = tiny(family)
    reference = run(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the documented dense-equivalent setting warns nothing
        with patchattn.patched(model, "gna", **GNAConfig.DENSE_EQUIVALENT):
            assert torch.equal(run(model, inputs), reference)
    patchattn.patch(model, "gna", **SMALL)
    assert not torch.equal(run(model, inputs), reference)
    patchattn.unpatch(model)
    assert torch.equal(run(model, inputs), reference)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_cfg_batch_rows_are_independent(family):
    model, inputs = tiny(family)
    with patchattn.patched(model, "gna", **SMALL):
        both = run(model, inputs)
        for row in range(2):
            alone = {k: (v[row:row + 1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v)
                     for k, v in inputs.items()}
            torch.testing.assert_close(run(model, alone), both[row:row + 1], atol=1e-5, rtol=1e-4)


def test_dense_schedule_steps_run_dense():
    model, inputs = tiny("flux")
    reference = run(model, inputs)
    with patchattn.patched(model, "gna", dense_first_steps=1, **SMALL):
        assert torch.equal(run(model, inputs), reference)  # step 0: the warm-up step
        later = run(model, dict(inputs, timestep=inputs["timestep"] * 0.5))
    with patchattn.patched(model, "test_gna_oracle", **SMALL):
        torch.testing.assert_close(later, run(model, dict(inputs, timestep=inputs["timestep"] * 0.5)),
                                   atol=1e-5, rtol=1e-4)


def test_plans_are_built_once_and_kept_per_module():
    model, inputs = tiny("sd3")
    with patchattn.patched(model, "gna", **SMALL):
        run(model, inputs)
        states = [m.patchattn.method_state for m in model.modules()
                  if isinstance(getattr(m, "patchattn", None), PatchState)]
        assert all(len(s.plans) == 1 for s in states)
        by_layout = {}
        for s in states:
            (key, plan), = s.plans.items()
            by_layout.setdefault(key, []).append(plan)
        assert len(by_layout) == 2 and len(states) == 3  # joint (2 layers) and self (SD3's dual attention)
        assert all(p is plans[0] for plans in by_layout.values() for p in plans)  # shared by every layer


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_key_padding_mask_runs_in_the_engine(dtype, backend, request):
    """Padded text of a varlen batch: each row hides its own keys (a whole text block for row 0)."""
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    config = GNAConfig(backend=backend, tile_tokens=16, window=3)
    grid, image, text = (1, 4, 5), (0, 20), ((20, 40),)
    q, k, v = (torch.randn(2, 2, 40, 8) for _ in range(3))
    keep = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    keep[0, ..., 24:40] = False
    keep[1, ..., 37:] = False
    mask = keep if dtype == torch.bool else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    module = _module(config, grid, image, text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dense fallback
        out, _ = get_spec("gna").forward(module, q, k, v, mask, scaling=None)
    expected = dense_sdpa(q, k, v, _oracle_mask(config, grid, image, text, 40) & keep)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_a_query_dependent_mask_is_honoured_densely():
    config = GNAConfig(backend="torch", tile_tokens=16, window=3)
    grid, image, text = (1, 4, 5), (0, 20), ()
    q, k, v = (torch.randn(1, 2, 20, 8) for _ in range(3))
    keep = torch.ones(1, 1, 20, 20, dtype=torch.bool)
    keep[..., 3:, 7] = False
    module = _module(config, grid, image, text)
    with pytest.warns(UserWarning, match="attn_mask"):
        out, _ = get_spec("gna").forward(module, q, k, v, keep, scaling=None)
    mask = _oracle_mask(config, grid, image, text, 20) & keep
    torch.testing.assert_close(out, dense_sdpa(q, k, v, mask), atol=1e-5, rtol=1e-4)
