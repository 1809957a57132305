"""clear on DiTs: the circular-window mask against a token-by-token oracle (CLEAR's mask_mod rule), the method against
SDPA with that mask (forward and backward, torch and Triton), every tiny DiT family against an oracle method, the
dense-equivalent setting, unpatch, schedules and key padding."""

import math
import warnings
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("diffusers")

from dit_cases import CASES, FAMILIES, run, spans, tiny

import patchattn
from patchattn.masks.circular import circular_plan
from patchattn.methods._dit import dense_sdpa, dit_call, scheduled_dense
from patchattn.methods.clear import ClearConfig
from patchattn.registry import get_spec
from patchattn.state import PatchContext, PatchState, TokenLayout


# ---- the oracle: CLEAR's rule, token by token ------------------------------------------------------------------
def oracle_mask(grid, image, text, *, radius, frame_window=0):
    """Image queries: image keys of frames within frame_window inside the circle (strict), and all text; text
    queries: everything."""
    frames, height, width = grid
    s = height * width
    length = frames * s + sum(b - a for a, b in text)
    mask = torch.ones(length, length, dtype=torch.bool)
    for q in range(image[0], image[1]):
        fq, yq, xq = (q - image[0]) // s, (q - image[0]) % s // width, (q - image[0]) % width
        for k in range(image[0], image[1]):
            fk, yk, xk = (k - image[0]) // s, (k - image[0]) % s // width, (k - image[0]) % width
            mask[q, k] = abs(fq - fk) <= frame_window and (yq - yk) ** 2 + (xq - xk) ** 2 < radius ** 2
    return mask


MASKS = [
    # grid, text tokens, text first, settings
    ((1, 5, 7), 3, False, {"radius": 2.0}),
    ((1, 11, 13), 5, True, {"radius": 4.2}),  # odd sizes: tiles cut by the grid's edge
    ((1, 1, 23), 0, None, {"radius": 3}),  # one row
    ((3, 4, 3), 6, True, {"radius": 1.5}),  # video: the circle inside each frame
    ((4, 3, 5), 2, False, {"radius": 2, "frame_window": 2}),
    ((2, 9, 6), 0, None, {"radius": 3, "frame_window": 1}),
]


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("grid, n_text, text_first, settings", MASKS)
def test_plan_equals_the_token_oracle(grid, n_text, text_first, settings, block):
    image, text = spans(grid, n_text, text_first)
    plan = circular_plan(grid, image=image, text=text, block=block, **settings)
    expected = oracle_mask(grid, image, text, **settings)
    assert torch.equal(plan.token_mask(), expected)
    assert plan.density == pytest.approx(expected.float().mean().item())
    assert plan.density < 1.0


def test_explicit_tiles_give_the_same_mask():
    grid, image, text = (1, 9, 10), (4, 94), ((0, 4),)
    expected = oracle_mask(grid, image, text, radius=3.5)
    for tile in [(4, 4), (2, 8), (16, 1)]:
        plan = circular_plan(grid, 3.5, image=image, text=text, block=16, tile=tile)
        assert torch.equal(plan.token_mask(), expected)


def test_a_real_size_plan_matches_the_closed_form_density():
    """FLUX 1024² (a 64 x 64 grid), radius 16, 512 text tokens: no T x T tensor, few distinct tiles, exact density."""
    n, r, n_text = 64, 16, 512
    plan = circular_plan((1, n, n), r, text=((n * n, n * n + n_text),), block=64)
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy * dy + dx * dx < r * r]
    image_pairs = sum((n - abs(dy)) * (n - abs(dx)) for dy, dx in offsets)
    total = n * n + n_text
    expected = (image_pairs + n_text * total + n * n * n_text) / total ** 2
    assert plan.density == pytest.approx(expected)
    assert plan.tiled.tile_masks.shape[0] < 64
    assert plan.tiled.tile_density() < 0.5


# ---- one attention call, against SDPA with the oracle's mask -----------------------------------------------
def _module(config, grid, image, text):
    layout = TokenLayout(text_slices=text, grid=grid, image_slice=image)
    module = torch.nn.Module()
    module.patchattn = PatchState(config, 0, "dit", PatchContext(family="test", kind="dit", layout=layout))
    return module


def _settings(config):
    return {"radius": config.radius, "frame_window": config.frame_window}


def _run_call(config, grid, n_text, text_first, *, batch=2, heads=2, dim=16, mask=None):
    image, text = spans(grid, n_text, text_first)
    length = math.prod(grid) + n_text
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen).requires_grad_() for _ in range(3))
    module = _module(config, grid, image, text)
    out, _ = get_spec("clear").forward(module, q, k, v, mask, scaling=0.3)
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
def test_clear_equals_sdpa_with_the_oracle_mask(grid, n_text, text_first, settings):
    config = ClearConfig(backend="torch", block=16, **settings)
    got, expected, module = _run_call(config, grid, n_text, text_first)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert module.patchattn.stats["density"] < 1.0


def test_clear_triton_interpreter(triton_interpreter):
    grid, n_text, text_first, settings = MASKS[1]
    config = ClearConfig(backend="triton", block=16, **settings)
    got, expected, _ = _run_call(config, grid, n_text, text_first, batch=1, heads=1)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_a_key_padding_mask_runs_in_the_engine(dtype):
    """HunyuanVideo's [video; text; padding]: each row hides its own padded text keys, in the engine."""
    config = ClearConfig(backend="torch", block=16, radius=2)
    grid, n_text = (3, 4, 5), 7
    keep = torch.ones(2, 1, 1, 60 + n_text, dtype=torch.bool)
    keep[0, ..., 62:] = False
    keep[1, ..., 66:] = False
    mask = keep if dtype == torch.bool else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dense fallback
        got, expected, _ = _run_call(config, grid, n_text, False, mask=mask)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_config_and_registration():
    with pytest.raises(ValueError, match="radius"):
        ClearConfig(radius=0)
    with pytest.raises(ValueError, match="tile"):
        ClearConfig(block=16, tile=[4, 8])
    with pytest.raises(ValueError, match="power of two"):
        ClearConfig(block=24)
    assert ClearConfig().radius == 16
    spec = get_spec("clear")
    assert spec.needs_finetune and spec.families == ("dit",)


# ---- whole tiny DiTs -------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class OracleConfig(ClearConfig):
    """clear's settings, run as dense SDPA with the token-by-token oracle mask."""


@patchattn.register_method("test_clear_oracle", config=OracleConfig, category="other", families=("dit",),
                           patterns=("noncausal-self", "noncausal-cross"), paper="test oracle")
def clear_oracle(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, is_causal=False,
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


SMALL = {"radius": 1.5, "block": 16, "backend": "torch"}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_dit_matches_the_oracle(family):
    model, inputs = tiny(family)
    with patchattn.patched(model, "test_clear_oracle", **SMALL):
        expected = run(model, inputs)
    with patchattn.patched(model, "clear", **SMALL):
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
        with patchattn.patched(model, "clear", **ClearConfig.DENSE_EQUIVALENT):
            assert torch.equal(run(model, inputs), reference)
    patchattn.patch(model, "clear", **SMALL)
    assert not torch.equal(run(model, inputs), reference)
    patchattn.unpatch(model)
    assert torch.equal(run(model, inputs), reference)


def test_a_radius_covering_one_frame_is_still_per_frame_on_video():
    """A circle past the frame's diagonal covers the frame, not the video: frames stay apart (frame_window 0)."""
    model, inputs = tiny("cogvideox")
    reference = run(model, inputs)
    with patchattn.patched(model, "test_clear_oracle", radius=100, block=16, backend="torch"):
        expected = run(model, inputs)
    with patchattn.patched(model, "clear", radius=100, block=16, backend="torch"):
        got = run(model, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.equal(got, reference)
    with patchattn.patched(model, "clear", radius=100, frame_window=2):  # 3 frames: all within reach, dense
        assert torch.equal(run(model, inputs), reference)


def test_warm_up_steps_and_dense_layers_run_dense():
    model, inputs = tiny("flux")
    reference = run(model, inputs)
    later = dict(inputs, timestep=inputs["timestep"] * 0.5)
    with patchattn.patched(model, "clear", **dict(SMALL, dense_first_steps=1)):
        assert torch.equal(run(model, inputs), reference)  # step 0: the warm-up step
        got = run(model, later)
    with patchattn.patched(model, "test_clear_oracle", **SMALL):
        torch.testing.assert_close(got, run(model, later), atol=1e-5, rtol=1e-4)
    with patchattn.patched(model, "clear", **dict(SMALL, dense_layers=[1])):
        got = run(model, inputs)
        states = [m.patchattn for m in model.modules() if isinstance(getattr(m, "patchattn", None), PatchState)]
        assert [s.stats["density"] == 1.0 for s in states] == [s.layer_index == 1 for s in states]
    with patchattn.patched(model, "test_clear_oracle", **dict(SMALL, dense_layers=[1])):
        torch.testing.assert_close(got, run(model, inputs), atol=1e-5, rtol=1e-4)
