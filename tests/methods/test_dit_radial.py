"""radial on DiTs: the mask builder against a token-by-token oracle written from the paper's definition, the method
against SDPA with that mask (forward and backward, torch and Triton), every tiny DiT family against an oracle
method, the dense-equivalent setting, unpatch, schedules and key padding."""

import math
import warnings
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("diffusers")

from dit_cases import CASES, FAMILIES, run, spans, tiny

import patchattn
from patchattn.masks.radial import RadialRule, radial_plan
from patchattn.methods._dit import dense_sdpa, dit_call, scheduled_dense
from patchattn.methods.radial import RadialConfig
from patchattn.registry import get_spec
from patchattn.state import PatchContext, PatchState, TokenLayout


# ---- the oracle: the paper's rule, token by token ------------------------------------------------------------
def _sees(i, k, j, l, s, dense_band, decay, sink):
    """Query (frame i, raster k) sees key (frame j, raster l): the module docstring's rule, in plain Python."""
    d = abs(i - j)
    if d <= dense_band or (sink and j == 0):
        return True
    band = math.floor(math.log2(max(d, 1)))
    w = decay * s / 2 ** band
    if w >= 1:
        return abs(k - l) < w
    return k == l and d % math.ceil(1 / w) == 0


def oracle_mask(grid, image, text, *, dense_band=1, decay_factor=1.0, first_frame_sink=False):
    frames, height, width = grid
    s = height * width
    length = frames * s + sum(b - a for a, b in text)
    mask = torch.ones(length, length, dtype=torch.bool)  # text rows and columns: everything
    for q in range(image[0], image[1]):
        for k in range(image[0], image[1]):
            a, b = q - image[0], k - image[0]
            mask[q, k] = _sees(a // s, a % s, b // s, b % s, s, dense_band, decay_factor, first_frame_sink)
    return mask


MASKS = [
    # grid, text tokens, text first, settings
    ((3, 4, 3), 6, True, {}),  # CogVideoX's tiny grid: frames 0 and 2 half a window apart
    ((5, 3, 5), 0, None, {"decay_factor": 0.3}),
    ((9, 2, 3), 4, False, {"dense_band": 0, "decay_factor": 0.2, "first_frame_sink": True}),  # temporal decay
    ((17, 1, 2), 3, True, {"dense_band": 0, "decay_factor": 0.5}),  # bands past one token: every k-th frame
    ((1, 5, 7), 3, False, {"dense_band": -1, "decay_factor": 0.4}),  # an image: one frame, windowed
    ((6, 5, 7), 5, True, {"dense_band": 0, "decay_factor": 0.7}),  # odd frame size: frames straddle no block
]


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("grid, n_text, text_first, settings", MASKS)
def test_plan_equals_the_token_oracle(grid, n_text, text_first, settings, block):
    image, text = spans(grid, n_text, text_first)
    plan = radial_plan(grid, image=image, text=text, block=block, **settings)
    expected = oracle_mask(grid, image, text, **settings)
    assert torch.equal(plan.token_mask(), expected)
    assert plan.density == pytest.approx(expected.float().mean().item())
    assert plan.density < 1.0


def test_bands_follow_the_paper():
    rule = RadialRule(frames=32, tokens_per_frame=1024)
    assert [rule.band(d)[0] for d in (0, 1, 2)] == [True, True, False]  # band 0: |i - j| <= 1, dense
    assert [rule.band(d)[1] for d in (2, 3, 4, 7, 8, 16)] == [512, 512, 256, 256, 128, 64]  # halves per band
    deep = RadialRule(frames=2048, tokens_per_frame=4, dense_band=1)
    assert deep.band(8) == (False, 0.5, 2) and deep.band(1024) == (False, 4 / 1024, 256)  # every k-th frame
    assert not rule.covers_everything()
    assert RadialRule(frames=2, tokens_per_frame=1024).covers_everything()  # 2 frames: the central band
    assert RadialRule(frames=1, tokens_per_frame=1024).covers_everything()  # an image: one frame


def _band_pairs(s, w):
    """Pairs (k, l) of two frames of s tokens with |k - l| < w (closed form)."""
    c = min(s - 1, math.ceil(w) - 1)
    return s + 2 * sum(s - t for t in range(1, c + 1))


def test_a_real_size_plan_matches_the_closed_form_density():
    """Wan 2.1 480p, 81 frames (21 latent frames of 30 x 52): no T x T tensor, few distinct tiles, exact density."""
    grid = (21, 30, 52)
    plan = radial_plan(grid, block=64)
    rule = RadialRule(*grid[:1], grid[1] * grid[2])
    s = grid[1] * grid[2]
    pairs = 0
    for i in range(grid[0]):
        for j in range(grid[0]):
            dense, w, _ = rule.band(abs(i - j))
            pairs += s * s if dense else _band_pairs(s, w)
    assert plan.density == pytest.approx(pairs / (grid[0] * s) ** 2)
    assert plan.tiled.tile_masks.shape[0] < 200
    assert plan.tiled.partial_share() < 0.35
    assert plan.length == 21 * 1600  # frames of 1560 tokens padded to 25 blocks of 64


# ---- one attention call, against SDPA with the oracle's mask -----------------------------------------------
def _module(config, grid, image, text, method="radial"):
    layout = TokenLayout(text_slices=text, grid=grid, image_slice=image)
    module = torch.nn.Module()
    module.patchattn = PatchState(config, 0, "dit", PatchContext(family="test", kind="dit", layout=layout))
    return module


def _settings(config):
    return {"dense_band": config.dense_band, "decay_factor": config.decay_factor,
            "first_frame_sink": config.first_frame_sink}


def _run_call(config, grid, n_text, text_first, *, batch=2, heads=2, dim=16, mask=None):
    image, text = spans(grid, n_text, text_first)
    length = math.prod(grid) + n_text
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen).requires_grad_() for _ in range(3))
    module = _module(config, grid, image, text)
    out, _ = get_spec("radial").forward(module, q, k, v, mask, scaling=0.3)
    allowed = oracle_mask(grid, image, text, **_settings(config))
    if mask is not None:
        allowed = allowed & (mask if mask.dtype == torch.bool else mask > -1e4)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    expected = dense_sdpa(qr, kr, vr, allowed, scaling=0.3)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    return (out, q.grad, k.grad, v.grad), (expected, qr.grad, kr.grad, vr.grad), module


@pytest.mark.parametrize("grid, n_text, text_first, settings", MASKS)
def test_radial_equals_sdpa_with_the_oracle_mask(grid, n_text, text_first, settings):
    config = RadialConfig(backend="torch", block=16, dense_first_steps=0, **settings)
    got, expected, module = _run_call(config, grid, n_text, text_first)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert module.patchattn.stats["density"] < 1.0


def test_radial_triton_interpreter(triton_interpreter):
    grid, n_text, text_first, settings = MASKS[2]
    config = RadialConfig(backend="triton", block=16, dense_first_steps=0, **settings)
    got, expected, _ = _run_call(config, grid, n_text, text_first, batch=1, heads=1)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_a_key_padding_mask_runs_in_the_engine(dtype):
    """HunyuanVideo's [video; text; padding]: each row hides its own padded text keys, in the engine."""
    config = RadialConfig(backend="torch", block=16, dense_first_steps=0, decay_factor=0.4)
    grid, n_text = (4, 3, 4), 7
    keep = torch.ones(2, 1, 1, 48 + n_text, dtype=torch.bool)
    keep[0, ..., 50:] = False
    keep[1, ..., 54:] = False
    mask = keep if dtype == torch.bool else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dense fallback
        got, expected, _ = _run_call(config, grid, n_text, False, mask=mask)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="power of two"):
        RadialConfig(block=48)
    with pytest.raises(ValueError, match="decay_factor"):
        RadialConfig(decay_factor=0.0)
    with pytest.raises(ValueError, match="dense_band"):
        RadialConfig(dense_band=-2)
    defaults = RadialConfig()
    assert (defaults.dense_first_steps, defaults.dense_band, defaults.decay_factor, defaults.dense_layers) == \
        (12, 1, 1.0, [])


# ---- whole tiny DiTs -------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class OracleConfig(RadialConfig):
    """radial's settings, run as dense SDPA with the token-by-token oracle mask."""


@patchattn.register_method("test_radial_oracle", config=OracleConfig, category="other", families=("dit",),
                           patterns=("noncausal-self", "noncausal-cross"), paper="test oracle")
def radial_oracle(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, is_causal=False,
                  cross_attention=False, enable_gqa=False, **kwargs):
    """Dense SDPA under the oracle mask and the model's key padding (cross attention and scheduled calls dense)."""
    state = module.patchattn
    call = dit_call(state, query, cross_attention)
    mask = attention_mask
    if call.role != "cross" and not scheduled_dense(state.config, call):
        mask = oracle_mask(call.grid, call.image, call.text, **_settings(state.config)).to(query.device)
        if attention_mask is not None:  # HunyuanVideo's padded text: hidden keys stay hidden
            visible = attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1e4
            mask = mask & visible
    return dense_sdpa(query, key, value, mask, scaling=scaling, dropout=dropout, enable_gqa=enable_gqa), None


# Sparse on every family: the frame's own tokens windowed too (the image families have one frame).
SMALL = {"dense_band": -1, "decay_factor": 0.25, "block": 16, "dense_first_steps": 0, "backend": "torch"}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_dit_matches_the_oracle(family):
    model, inputs = tiny(family)
    with patchattn.patched(model, "test_radial_oracle", **SMALL):
        expected = run(model, inputs)
    with patchattn.patched(model, "radial", **SMALL):
        got = run(model, inputs)
        modules = [m for m in model.modules() if isinstance(getattr(m, "patchattn", None), PatchState)]
        densities = [m.patchattn.stats["density"] for m in modules]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert any(d < 1.0 for d in densities)
    assert ("cross" in CASES[family].roles.values()) == any(d == 1.0 for d in densities)  # cross stays dense


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_equivalent_reproduces_dense_and_unpatch_is_exact(family):
    model, inputs = tiny(family)
    reference = run(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the documented dense-equivalent setting warns nothing
        with patchattn.patched(model, "radial", dense_first_steps=0, **RadialConfig.DENSE_EQUIVALENT):
            assert torch.equal(run(model, inputs), reference)
    patchattn.patch(model, "radial", **SMALL)
    assert not torch.equal(run(model, inputs), reference)
    patchattn.unpatch(model)
    assert torch.equal(run(model, inputs), reference)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_paper_defaults_on_one_or_two_frames_are_dense(family):
    """An image (one frame) or two frames lie inside the dense central band |i - j| <= 1: exact dense."""
    model, inputs = tiny(family)
    reference = run(model, inputs)
    with patchattn.patched(model, "radial", dense_first_steps=0):
        assert torch.equal(run(model, inputs), reference)


def test_paper_defaults_are_sparse_on_three_frames():
    model, inputs = tiny("cogvideox")  # 3 frames: frames 0 and 2 are in band 1, half a frame's window
    with patchattn.patched(model, "test_radial_oracle", dense_first_steps=0, block=16, backend="torch"):
        expected = run(model, inputs)
    with patchattn.patched(model, "radial", dense_first_steps=0, block=16, backend="torch"):
        got = run(model, inputs)
        densities = [m.patchattn.stats["density"] for m in model.modules()
                     if isinstance(getattr(m, "patchattn", None), PatchState)]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert all(d < 1.0 for d in densities)


def test_warm_up_steps_and_dense_layers_run_dense():
    model, inputs = tiny("sd3")
    reference = run(model, inputs)
    later = dict(inputs, timestep=inputs["timestep"] * 0.5)
    with patchattn.patched(model, "radial", **dict(SMALL, dense_first_steps=1)):
        assert torch.equal(run(model, inputs), reference)  # step 0: the warm-up step
        got = run(model, later)
    with patchattn.patched(model, "test_radial_oracle", **SMALL):
        torch.testing.assert_close(got, run(model, later), atol=1e-5, rtol=1e-4)
    with patchattn.patched(model, "radial", **dict(SMALL, dense_layers=[0])):
        got = run(model, inputs)
        states = [m.patchattn for m in model.modules() if isinstance(getattr(m, "patchattn", None), PatchState)]
        assert [s.stats["density"] == 1.0 for s in states] == [s.layer_index == 0 for s in states]
    with patchattn.patched(model, "test_radial_oracle", **dict(SMALL, dense_layers=[0])):
        torch.testing.assert_close(got, run(model, inputs), atol=1e-5, rtol=1e-4)


def test_plans_are_built_once_and_shared_by_layers():
    model, inputs = tiny("wan")
    with patchattn.patched(model, "radial", **SMALL):
        run(model, inputs)
        run(model, inputs)
        states = [m.patchattn.method_state for m in model.modules()
                  if isinstance(getattr(m, "patchattn", None), PatchState)]
        plans = [plan for s in states for plan in s.plans.values()]
        assert len(plans) == 2 and plans[0] is plans[1]  # two attn1 layers, one plan; attn2 (cross) has none
