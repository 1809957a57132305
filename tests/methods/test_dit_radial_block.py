"""radial's ``granularity="block"``: the token rule rounded outward to the engine's blocks.  Checked against a brute
force written here: the token-by-token rule, pooled to the layout's blocks (a block pair is read whole when any of
its real token pairs is visible), spread back to tokens; the only partial tiles left are those of padded keys."""

import math
import warnings

import pytest
import torch
from dit_cases import call_against_sdpa, dit_module, pooled_mask, spans
from test_dit_radial import oracle_mask

from patchattn.masks.frames import PAD, frame_layout
from patchattn.masks.radial import radial_plan
from patchattn.methods.radial import RadialConfig, plan_for

CASES = [
    # grid, text tokens, text first, settings
    ((3, 4, 3), 6, True, {}),  # the paper's defaults on three frames
    ((5, 3, 5), 0, None, {"decay_factor": 0.3}),
    ((9, 2, 3), 4, False, {"dense_band": 0, "decay_factor": 0.2, "first_frame_sink": True}),  # the Wan setting
    ((17, 1, 2), 3, True, {"dense_band": 0, "decay_factor": 0.5}),  # temporal decay: every k-th frame
    ((6, 5, 7), 5, True, {"dense_band": 0, "decay_factor": 0.7}),  # 35 tokens per frame: padded last blocks
    ((4, 4, 8), 0, None, {"dense_band": 0, "decay_factor": 0.3}),  # 32 tokens per frame: no padding at block 16/32
]


def _expected(grid, image, text, block, settings):
    layout = frame_layout(grid, image, text, block)
    blocks = layout.position // block
    return oracle_mask(grid, image, text, **settings), pooled_mask(oracle_mask(grid, image, text, **settings), blocks), \
        layout


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("grid, n_text, text_first, settings", CASES)
def test_block_mask_is_the_token_mask_pooled_to_blocks(grid, n_text, text_first, settings, block):
    image, text = spans(grid, n_text, text_first)
    exact, expected, _ = _expected(grid, image, text, block, settings)
    plan = radial_plan(grid, image=image, text=text, block=block, granularity="block", **settings)
    got = plan.token_mask()
    assert torch.equal(got, expected)
    assert bool((got | ~exact).all())  # a superset of the token-exact mask
    assert plan.density == pytest.approx(expected.float().mean().item())  # what the engine reads, real tokens only
    token_plan = radial_plan(grid, image=image, text=text, block=block, **settings)
    assert plan.density >= token_plan.density
    assert plan.listed_tiles == token_plan.listed_tiles  # the same block pairs, now read whole


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("grid, n_text, text_first, settings", CASES)
def test_only_tiles_of_padded_keys_stay_partial(grid, n_text, text_first, settings, block):
    image, text = spans(grid, n_text, text_first)
    layout = frame_layout(grid, image, text, block)
    plan = radial_plan(grid, image=image, text=text, block=block, granularity="block", **settings)
    tiled = plan.tiled
    kind = torch.full((layout.n_blocks * block,), -1)  # -1: past the sequence (cut by its length, not padding)
    kind[:layout.length] = layout.kind
    padded_key_block = (kind.view(-1, block) == PAD).any(1)  # [n_blocks]
    listed = torch.arange(tiled.kv_indices.shape[-1]) < tiled.kv_counts[0, 0, :, None]
    keys = tiled.kv_indices[0, 0].long()
    ids = tiled.tile_mask_ids[0, 0]
    partial = listed & (ids >= 0)
    assert torch.equal(partial, listed & padded_key_block[keys])  # partial iff the key block holds padding
    assert plan.partial_tiles == int(partial.sum()) == tiled.tile_counts()[1]
    assert plan.listed_tiles == int(listed.sum())
    # A partial tile hides exactly the padded key slots, for every query row.
    real_keys = (kind.view(-1, block) > PAD)[keys[partial]]
    assert torch.equal(tiled.tile_masks[ids[partial].long()], real_keys[:, None, :].expand(-1, block, block))
    if not padded_key_block.any():
        assert plan.partial_tiles == 0 and tiled.tile_masks.shape[0] == 0


def test_block_mode_removes_most_partial_tiles():
    grid, settings = (6, 5, 7), {"dense_band": 0, "decay_factor": 0.2, "first_frame_sink": True}
    token = radial_plan(grid, block=16, **settings)
    block = radial_plan(grid, block=16, granularity="block", **settings)
    assert block.partial_tiles < token.partial_tiles
    assert block.listed_tiles == token.listed_tiles


# ---- one attention call against SDPA with the rounded mask -------------------------------------------------------
def _run_call(config, grid, n_text, text_first, *, batch=2, heads=2):
    image, text = spans(grid, n_text, text_first)
    settings = {"dense_band": config.dense_band, "decay_factor": config.decay_factor,
                "first_frame_sink": config.first_frame_sink}
    _, allowed, _ = _expected(grid, image, text, config.block, settings)
    module = dit_module(config, grid, image, text)
    got, expected, _ = call_against_sdpa("radial", module, math.prod(grid) + n_text, lambda _: allowed, batch=batch,
                                         heads=heads)
    return got, expected, module, allowed


@pytest.mark.parametrize("grid, n_text, text_first, settings", CASES)
def test_block_mode_equals_sdpa_with_the_rounded_mask(grid, n_text, text_first, settings):
    config = RadialConfig(backend="torch", block=16, dense_first_steps=0, granularity="block", **settings)
    got, expected, module, allowed = _run_call(config, grid, n_text, text_first)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert module.patchattn.stats["density"] == pytest.approx(allowed.float().mean().item())


def test_block_mode_triton_interpreter(triton_interpreter):
    grid, n_text, text_first, settings = CASES[4]  # padded key blocks: partial tiles in the kernels too
    config = RadialConfig(backend="triton", block=16, dense_first_steps=0, granularity="block", **settings)
    got, expected, _, _ = _run_call(config, grid, n_text, text_first, batch=1, heads=1)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_plans_are_kept_apart_by_granularity():
    grid, image, text = (6, 5, 7), (0, 210), ()
    module = dit_module(RadialConfig(), grid, image, text)
    call = type("Call", (), {"grid": grid, "image": image, "text": text})()
    plans = [plan_for(module.patchattn, RadialConfig(granularity=g, dense_band=0, decay_factor=0.5), call, "cpu")
             for g in ("token", "block", "token")]
    assert plans[0] is plans[2] and plans[0] is not plans[1]
    assert plans[1].density > plans[0].density


def test_granularity_is_checked():
    with pytest.raises(ValueError, match="granularity"):
        RadialConfig(granularity="tile")
    with pytest.raises(ValueError, match="granularity"):
        radial_plan((3, 4, 4), granularity="row")
    assert RadialConfig().granularity == "token"


def test_dense_equivalent_is_dense_in_block_mode():
    pytest.importorskip("diffusers")
    from dit_cases import run, tiny

    import patchattn

    model, inputs = tiny("wan")
    reference = run(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with patchattn.patched(model, "radial", dense_first_steps=0, granularity="block",
                               **RadialConfig.DENSE_EQUIVALENT):
            assert torch.equal(run(model, inputs), reference)
    with patchattn.patched(model, "radial", dense_first_steps=0, dense_band=-1, decay_factor=0.25, block=16,
                           backend="torch", granularity="block"):
        assert not torch.equal(run(model, inputs), reference)
