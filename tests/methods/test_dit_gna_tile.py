"""gna's ``granularity="tile"``: the neighborhoods rounded outward to the tiles they touch (HaloNet-style blocked
local attention).  Checked against a brute force: the token-by-token neighborhood mask pooled to the plan's tiles (a
tile pair is read whole when any of its real token pairs is visible), spread back to tokens; the only partial tiles
left are those of padded keys."""

import math
import warnings

import pytest
import torch
from dit_cases import call_against_sdpa, dit_module, pooled_mask, spans

from patchattn.masks.neighborhood import neighborhood_plan, neighborhood_token_mask, with_text
from patchattn.methods.gna import GNAConfig, neighborhood_for

PLANS = [
    # grid, text tokens, text first, window, stride, dilation, causal, tile
    ((1, 5, 7), 0, None, 3, 1, 1, False, (1, 4, 4)),  # padded on both axes
    ((1, 6, 5), 4, True, (1, 3, 4), (1, 1, 2), 1, False, (1, 2, 8)),
    ((1, 4, 9), 7, False, (1, 4, 3), (1, 2, 3), (1, 1, 2), (False, True, False), (1, 4, 4)),  # dilation, causal
    ((3, 4, 5), 0, None, (2, 3, 3), (1, 1, 3), 1, (True, False, False), (1, 4, 4)),
    ((4, 3, 5), 5, True, (3, 2, 4), (3, 2, 2), (1, 1, 2), False, (2, 2, 4)),
    ((1, 16, 16), 0, None, 5, 1, 1, False, (1, 4, 4)),  # whole tiles, no padding
]


def _plan_and_expected(grid, n_text, text_first, window, stride, dilation, causal, tile):
    image, text = spans(grid, n_text, text_first)
    plan = neighborhood_plan(grid, window, stride, dilation, causal, tile=tile, block=math.prod(tile), image=image,
                             text=text, granularity="tile")
    exact = with_text(neighborhood_token_mask(grid, window, stride, dilation, causal), plan.position.shape[0], image,
                      text)
    return plan, exact, pooled_mask(exact, plan.position // math.prod(tile))


@pytest.mark.parametrize("case", PLANS)
def test_tile_mask_is_the_neighborhood_mask_pooled_to_tiles(case):
    plan, exact, expected = _plan_and_expected(*case)
    got = plan.token_mask()
    assert torch.equal(got, expected)
    assert bool((got | ~exact).all())  # a superset of the token-exact mask
    assert plan.density == pytest.approx(expected.float().mean().item())
    grid, n_text, text_first, window, stride, dilation, causal, tile = case
    token = neighborhood_plan(grid, window, stride, dilation, causal, tile=tile, block=math.prod(tile),
                              image=spans(grid, n_text, text_first)[0], text=spans(grid, n_text, text_first)[1])
    assert plan.listed_tiles == token.listed_tiles and plan.partial_tiles <= token.partial_tiles


@pytest.mark.parametrize("case", PLANS)
def test_only_tiles_of_padded_keys_stay_partial(case):
    plan, _, _ = _plan_and_expected(*case)
    tiled, size = plan.tiled, math.prod(case[-1])
    occupied = torch.zeros(tiled.num_k_blocks * size, dtype=torch.bool)
    occupied[plan.position] = True
    occupied[plan.length:] = True  # past the sequence: cut by its length, not padding
    padded_key_block = (~occupied).view(-1, size).any(1)
    listed = torch.arange(tiled.kv_indices.shape[-1]) < tiled.kv_counts[0, 0, :, None]
    keys = tiled.kv_indices[0, 0].long()
    ids = tiled.tile_mask_ids[0, 0]
    partial = listed & (ids >= 0)
    assert torch.equal(partial, listed & padded_key_block[keys])
    assert plan.partial_tiles == int(partial.sum())
    real_keys = occupied.view(-1, size)[keys[partial]]
    assert torch.equal(tiled.tile_masks[ids[partial].long()], real_keys[:, None, :].expand(-1, size, size))


def test_sliding_window_loses_its_partial_tiles():
    token = neighborhood_plan((64, 64), 20, 1, block=16, tile=(4, 4))
    tile = neighborhood_plan((64, 64), 20, 1, block=16, tile=(4, 4), granularity="tile")
    assert token.partial_tiles > 0 and tile.partial_tiles == 0
    assert tile.listed_tiles == token.listed_tiles and tile.density > token.density
    aligned = neighborhood_plan((64, 64), 20, 4, block=16, tile=(4, 4))  # already whole: rounding changes nothing
    same = neighborhood_plan((64, 64), 20, 4, block=16, tile=(4, 4), granularity="tile")
    assert aligned.partial_tiles == 0 and torch.equal(aligned.tiled.kv_indices, same.tiled.kv_indices)
    assert aligned.density == pytest.approx(same.density)
    with pytest.raises(ValueError, match="granularity"):
        neighborhood_plan((8, 8), 3, granularity="block")


# ---- the method, against SDPA with the rounded mask ----------------------------------------------------------------
CALLS = [
    ((1, 6, 5), 4, True, {"window": [3, 4], "stride": [1, 2], "tile": [2, 8]}),
    ((4, 3, 5), 5, False, {"window": [3, 2, 4], "stride": [3, 2, 2], "dilation": [1, 1, 2], "tile": [2, 2, 4]}),
]


def _run_call(config, grid, n_text, text_first, *, batch=2, heads=2):
    image, text = spans(grid, n_text, text_first)
    length = math.prod(grid) + n_text
    hood = neighborhood_for(config, grid)
    exact = with_text(neighborhood_token_mask(hood.grid, hood.window, hood.stride, hood.dilation, hood.causal),
                      length, image, text)

    def allowed_of(module):  # the plan's tiles, known after the call
        plan = next(iter(module.patchattn.method_state.plans.values()))
        return pooled_mask(exact, plan.position // plan.tiled.block_q)

    module = dit_module(config, grid, image, text)
    got, expected, allowed = call_against_sdpa("gna", module, length, allowed_of, batch=batch, heads=heads)
    return got, expected, module, allowed


@pytest.mark.parametrize("grid, n_text, text_first, settings", CALLS)
def test_tile_mode_equals_sdpa_with_the_rounded_mask(grid, n_text, text_first, settings):
    config = GNAConfig(backend="torch", granularity="tile", **settings)
    got, expected, module, allowed = _run_call(config, grid, n_text, text_first)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert module.patchattn.stats["density"] == pytest.approx(allowed.float().mean().item())
    assert not bool(allowed.all())


def test_tile_mode_triton_interpreter(triton_interpreter):
    grid, n_text, text_first, settings = CALLS[1]
    config = GNAConfig(backend="triton", granularity="tile", **settings)
    got, expected, _, _ = _run_call(config, grid, n_text, text_first, batch=1, heads=1)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_dense_equivalent_is_dense_in_tile_mode():
    pytest.importorskip("diffusers")
    from dit_cases import run, tiny

    import patchattn

    model, inputs = tiny("wan")
    reference = run(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with patchattn.patched(model, "gna", granularity="tile", **GNAConfig.DENSE_EQUIVALENT):
            assert torch.equal(run(model, inputs), reference)
    with pytest.raises(ValueError, match="granularity"):
        GNAConfig(granularity="block")
