"""Neighborhood attention masks: the tiled plan (permutation + block lists + partial tiles) against the token-level
definition, on 1D/2D/3D grids with every stride / dilation / causal combination and with text tokens."""

import itertools
import math

import pytest
import torch

from patchattn.masks.neighborhood import (
    Neighborhood,
    axis_sees,
    choose_tile,
    neighborhood_plan,
    neighborhood_token_mask,
    tile_cost,
    with_text,
)


def _plan_mask(plan):
    """The plan's token mask in the call's order, checked for ascending lists on the way."""
    tiled = plan.tiled
    for row, count in zip(tiled.kv_indices[0, 0], tiled.kv_counts[0, 0]):
        listed = row[:count]
        assert torch.all(listed[1:] > listed[:-1])
    return plan.token_mask()


# ---- the definition itself, on hand-checked cases ------------------------------------------------------------------
def test_axis_rule_matches_natten_on_hand_cases():
    row = lambda q, **kw: [k for k in range(10) if axis_sees(q, k, 10, **kw)]
    plain = {"stride": 1, "dilation": 1, "causal": False}
    assert row(5, window=3, **plain) == [4, 5, 6]
    assert row(0, window=3, **plain) == [0, 1, 2]          # shifted inside the axis, never shrunk
    assert row(9, window=3, **plain) == [7, 8, 9]
    assert row(5, window=4, **plain) == [3, 4, 5, 6]        # even window 2r: r left, r - 1 right
    assert row(5, window=3, stride=1, dilation=2, causal=False) == [3, 5, 7]
    assert row(5, window=3, stride=1, dilation=1, causal=True) == [3, 4, 5]
    assert row(1, window=3, stride=1, dilation=1, causal=True) == [0, 1]  # causal windows shrink at the start
    # stride 4: queries 4..7 share the window of their leader 6 (the right middle one)
    assert all(row(q, window=4, stride=4, dilation=1, causal=False) == [4, 5, 6, 7] for q in range(4, 8))
    # causal stride: the leader is the run's last query; each query still sees no key after itself
    assert row(4, window=4, stride=4, dilation=1, causal=True) == [4]
    assert row(7, window=4, stride=4, dilation=1, causal=True) == [4, 5, 6, 7]
    assert row(5, window=30, **plain) == list(range(10))   # a window beyond the axis covers it


def test_token_mask_is_the_product_of_axes():
    mask = neighborhood_token_mask((3, 4), (1, 3), 1, 1, False).reshape(3, 4, 3, 4)
    eye = torch.eye(3, dtype=torch.bool)
    assert torch.equal(mask.any(dim=(1, 3)), eye)
    assert torch.equal(mask[0, :, 0, :], neighborhood_token_mask((4,), 3))


# ---- the plan against the definition -------------------------------------------------------------------------------
def _settings(dims, extents):
    """Windows (odd, even, beyond the axis), strides (1, middle, blocked), dilation, causal, per axis mixed."""
    windows = [3, 4, max(extents) + 2]
    for window, stride_kind, dilation, causal in itertools.product(windows, ("1", "mid", "block"), (1, 2),
                                                                   (False, True)):
        stride = {"1": 1, "mid": max(1, window // 2), "block": window}[stride_kind]
        if window > max(extents) and stride_kind != "1":
            continue
        yield window, stride, dilation, causal


GRIDS = [(13,), (6, 5), (4, 5, 6)]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_plan_matches_the_definition(grid):
    dims = len(grid)
    checked = 0
    for window, stride, dilation, causal in _settings(dims, grid):
        reference = neighborhood_token_mask(grid, window, stride, dilation, causal)
        for block in (16, 32):
            plan = neighborhood_plan(grid, window, stride, dilation, causal, block=block)
            assert torch.equal(_plan_mask(plan), reference), (grid, window, stride, dilation, causal, block, plan.tile)
            assert plan.density == pytest.approx(reference.float().mean().item())
            checked += 1
    assert checked >= 40


MIXED = [
    ((5, 7), (3, 4), (1, 2), (2, 1), (False, True)),
    ((4, 5, 6), (2, 3, 4), (2, 1, 3), (1, 2, 1), (True, False, False)),
    ((3, 6, 5), (3, 6, 2), (3, 3, 1), (1, 1, 2), (False, False, True)),
    ((7, 3, 2), (5, 2, 2), (2, 2, 2), (1, 1, 1), (True, True, False)),
]


@pytest.mark.parametrize("grid, window, stride, dilation, causal", MIXED)
@pytest.mark.parametrize("tile", [None, "explicit"])
def test_per_axis_settings_and_tiles(grid, window, stride, dilation, causal, tile):
    reference = neighborhood_token_mask(grid, window, stride, dilation, causal)
    # An explicit tile that cuts every axis unevenly (padding on each axis) against the chosen one.
    shape = {2: (4, 4), 3: (2, 4, 2)}[len(grid)] if tile else None
    plan = neighborhood_plan(grid, window, stride, dilation, causal, tile=shape, block=16)
    assert torch.equal(_plan_mask(plan), reference)


@pytest.mark.parametrize("n_text", [1, 5, 16, 21])
@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("grid, window, stride, dilation, causal", MIXED[:2] + [((11,), 4, 2, 2, True)])
def test_text_tokens_are_additional_keys(grid, window, stride, dilation, causal, n_text, text_first):
    n_image = math.prod(grid)
    image = (n_text, n_text + n_image) if text_first else (0, n_image)
    text = ((0, n_text),) if text_first else ((n_image, n_image + n_text),)
    reference = with_text(neighborhood_token_mask(grid, window, stride, dilation, causal), n_image + n_text, image,
                          text)
    plan = neighborhood_plan(grid, window, stride, dilation, causal, block=16, image=image, text=text)
    assert torch.equal(_plan_mask(plan), reference)
    assert plan.density == pytest.approx(reference.float().mean().item())
    # Text keys are whole blocks for every query (their ragged tail is cut by the sequence length, not a tile).
    tiled = plan.tiled
    text_blocks = torch.arange(math.ceil(plan.length / 16))[-math.ceil(n_text / 16):]
    in_text = torch.isin(tiled.kv_indices[0, 0], text_blocks)
    listed = torch.arange(tiled.kv_indices.shape[-1])[None] < tiled.kv_counts[0, 0, :, None]
    assert torch.all(tiled.tile_mask_ids[0, 0][in_text & listed] == -1)


@pytest.mark.parametrize("grid", [(3, 5, 6), (4, 4, 8)], ids=["padded", "whole-tiles"])
def test_permutation_round_trip(grid):
    n = math.prod(grid)
    plan = neighborhood_plan(grid, 3, block=16, image=(4, 4 + n), text=((0, 4),))
    x = torch.randn(2, 3, n + 4, 8)
    permuted = plan.permute(x)
    assert permuted.shape[2] == plan.length
    assert torch.equal(plan.unpermute(permuted), x)
    assert torch.unique(plan.position).numel() == n + 4  # every token has its own slot
    padding = torch.ones(plan.length, dtype=torch.bool)
    padding[plan.position] = False
    assert not permuted[:, :, padding].any()


# ---- partial tiles: few, and none where stride and tiles align (GNA's point) ------------------------------------
def test_identical_partial_tiles_are_stored_once():
    plan = neighborhood_plan((32, 32), 7, 1, block=64, tile=(8, 8))
    ids = plan.tiled.tile_mask_ids[0, 0]
    listed = torch.arange(ids.shape[1])[None] < plan.tiled.kv_counts[0, 0, :, None]
    assert plan.partial_tiles == int(((ids >= 0) & listed).sum()) > plan.distinct_tiles
    masks = plan.tiled.tile_masks
    assert torch.unique(masks.flatten(1), dim=0).shape[0] == masks.shape[0]  # no two stored masks equal
    assert not masks.flatten(1).all(1).any() and masks.flatten(1).any(1).all()  # none whole, none empty


def test_aligned_stride_gives_whole_tiles_only():
    # Blocked attention (stride = window = a multiple of the tile) and GNA's FLUX-4K setting, scaled down.
    assert neighborhood_plan((32, 32), 8, 8, block=64, tile=(8, 8)).partial_tiles == 0
    plan = neighborhood_plan((64, 64), 20, 4, block=16, tile=(4, 4))
    assert plan.partial_tiles == 0
    # The same window sliding (stride 1) has partial tiles along every neighborhood edge.
    assert neighborhood_plan((64, 64), 20, 1, block=16, tile=(4, 4)).partial_tiles > 0


def test_tile_choice_prefers_tiles_aligned_with_the_stride():
    hood = Neighborhood.of((8, 64, 64), (4, 16, 16), (4, 8, 8))
    tile = choose_tile(hood, 64)
    assert tile_cost(hood, tile)[2] == 0
    assert tile_cost(hood, tile)[0] <= min(tile_cost(hood, t)[0] for t in [(4, 4, 4), (1, 8, 8), (2, 4, 8)])


def test_large_grid_plan_has_no_token_by_token_tensor():
    # HunyuanVideo 720p's latent grid: the plan is per-axis interval arithmetic (seconds on a CPU, small lists).
    plan = neighborhood_plan((30, 48, 80), (18, 24, 24), (16, 8, 8), block=128)
    n_blocks = plan.tiled.kv_counts.shape[-1]
    assert plan.partial_tiles == 0
    assert plan.tiled.kv_indices.numel() < 0.2 * n_blocks ** 2
    assert plan.density == plan.listed_tiles / n_blocks ** 2  # whole tiles, no padding: blocks = tokens


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="stride"):
        neighborhood_plan((8, 8), 3, 4)
    with pytest.raises(ValueError, match="one value per grid axis"):
        neighborhood_plan((8, 8), (3, 3, 3, 3))
    with pytest.raises(ValueError, match="power of two"):
        neighborhood_plan((8, 8), 3, tile=(3, 4))
    with pytest.raises(ValueError, match="cover the sequence"):
        neighborhood_plan((2, 2), 1, image=(0, 4), text=((5, 6),))
