"""The common ``density`` knob: every sparse method reads the asked share of the causal block pairs, dense at 1.0,
consistent while decoding, validated with clear errors.

Tolerances, in density units, for a full forward over ``n`` blocks (``n (n + 1) / 2`` causal block pairs):

* ``step = 2 / (n + 1)`` is one key block more in every query block's row.  The budget fields move in whole blocks
  per row (a window, a top-k, a local run), so neighbouring budgets differ by at most one step, and the solver picks
  the closest: the exact methods land within **half a step** of the target.
* ``hip`` reads at most the target: its search may pick a sink or local block again, so it reads up to
  ``sinks + local`` blocks less per row (``(sinks + local) * step`` below).
* ``moa``'s band is its token-level closed form (its default behaviour), rounded out to whole blocks: it reads no
  less than asked and at most the sink block and two band-edge blocks more per row (``3 * step`` above).
"""

import math

import pytest
import torch

import patchattn
from patchattn.masks import BlockGeometry, causal_allowed, power_of_two, sink_and_window, strided_shards
from patchattn.methods._budget import resolved_config
from patchattn.methods._sparse import SparseConfig
from patchattn.registry import get_spec
from patchattn.testing import max_abs_diff, tiny_model

SPARSE = [s.name for s in patchattn.list_methods("sparse")]
STATIC = [name for name in SPARSE if get_spec(name).static]
SMALL = {"block_size": 16, "backend": "torch"}
# Per-method settings for the tiny model: duo's paper sink is 64 tokens (one 64-token block); with 16-token blocks
# one block is 16.  Its retrieval share is tested on its own below (here every head streams).
TEST_SETTINGS = {"duo": {"sink_tokens": 16, "retrieval_fraction": 0.0}}
TOL = 1e-5
# The tiny model has no retrieval scores: duo says so (layer order) at every patch.
pytestmark = pytest.mark.filterwarnings("ignore:patchattn duo. no retrieval-head scores")


def test_every_sparse_method_maps_density():
    assert set(SPARSE) == {"streaming", "power", "s2", "blocktopk", "hip", "hyper", "moa", "duo"}
    for name in SPARSE:
        config = patchattn.get_config(name, density=0.3)
        assert config.density == 0.3 and type(config).fields_for_density is not SparseConfig.fields_for_density


def _sparse_layer_densities(model, config):
    """Per-layer densities of the layers the method makes sparse (``dense_layers`` stay dense by choice)."""
    return [float(layer.self_attn.patchattn.stats["density"]) for i, layer in enumerate(model.model.layers)
            if i not in config.dense_layers]


@pytest.mark.parametrize("length", [1000, 2048])
@pytest.mark.parametrize("target", [0.25, 0.5])
@pytest.mark.parametrize("method", SPARSE)
def test_measured_density_meets_the_target(method, target, length):
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad(), patchattn.patched(model, method, density=target, **SMALL,
                                            **TEST_SETTINGS.get(method, {})) as handle:
        model(input_ids=ids)
        densities = _sparse_layer_densities(model, handle.config)
    measured = sum(densities) / len(densities)
    n = math.ceil(length / 16)
    step = 2 / (n + 1)
    low, high = target - step / 2, target + step / 2
    if method == "hip":
        config = handle.config
        low = target - (config.sink_blocks + config.local_blocks) * step - step / 2
    if method == "moa":
        low, high = target, target + 3 * step
    assert low - 1e-9 <= measured <= high + 1e-9, (measured, low, high)


def test_duo_keeps_its_retrieval_share_and_fits_the_window_to_the_rest():
    model = tiny_model("llama")  # 2 layers x 2 KV heads: a quarter of the heads is one KV head, in layer 0
    ids = torch.randint(3, 100, (1, 2048), generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="layer order"):  # the tiny model has no scores: layer order
        handle = patchattn.patch(model, "duo", density=0.5, sink_tokens=16, **SMALL)
    with torch.no_grad():
        model(input_ids=ids)
    densities = _sparse_layer_densities(model, handle.config)
    patchattn.unpatch(model)
    assert handle.config.retrieval_fraction == 0.25
    assert densities[0] > densities[1], "the layer holding the retrieval head reads more"
    assert sum(densities) / 2 == pytest.approx(0.5, abs=1 / 129)
    with pytest.raises(ValueError, match="not above retrieval_fraction 0.25"):
        patchattn.get_config("duo", density=0.2)


@pytest.mark.parametrize("method", SPARSE)
def test_density_one_reproduces_dense(method):
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 300), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with patchattn.patched(model, method, density=1.0, **SMALL):
            out = model(input_ids=ids).logits
            densities = [float(layer.self_attn.patchattn.stats["density"]) for layer in model.model.layers]
    assert densities == pytest.approx([1.0] * len(densities))
    assert max_abs_diff(out, reference) <= TOL


@pytest.mark.parametrize("method", STATIC)
def test_decoding_uses_the_budget_of_a_full_recompute(method):
    """A decode step resolves the fields for the full forward over its keys, so generation through the cache and a
    recompute without it predict the same tokens (static patterns: a content-based choice for one decoded row differs
    from its query block's choice anyway)."""
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 90), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), patchattn.patched(model, method, density=0.3, **SMALL, **TEST_SETTINGS.get(method, {})):
        generated = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        full = model(input_ids=generated[:, :-1]).logits
    assert torch.equal(full[0, ids.shape[1] - 1:].argmax(-1), generated[0, ids.shape[1]:])


def test_resolution_depends_on_the_key_blocks_only():
    config = patchattn.get_config("streaming", density=0.3, block_size=16)
    prefill = resolved_config(config, BlockGeometry(500, 500, 16, 16))
    assert prefill.density is None and prefill.window != config.window
    assert resolved_config(config, BlockGeometry(1, 500, 16, 16)) is prefill  # a decode step over the same keys
    assert resolved_config(config, BlockGeometry(1, 497, 16, 16)) is prefill  # same 32 key blocks
    assert resolved_config(config, BlockGeometry(1, 1600, 16, 16)).window > prefill.window  # windows grow with n
    # Below what the sink and one recent block read at this length, the method reads that floor.
    floor = patchattn.get_config("streaming", density=0.01, block_size=16)
    assert resolved_config(floor, BlockGeometry(256, 256, 16, 16)).window == 1
    assert resolved_config(patchattn.get_config("streaming"), BlockGeometry(500, 500, 16, 16)).window == 1024


def _mask_density(mask, g):
    allowed = causal_allowed(g)
    heads = mask.shape[0] if mask.ndim == 3 else 1
    return float((mask & allowed).sum()) / (heads * float(allowed.sum()))


@pytest.mark.parametrize("n", [1, 2, 5, 17, 40, 63])
def test_static_mappings_read_exactly_what_their_masks_count(n):
    """The closed forms agree with the static masks: asked for the density a mask really has, each mapping returns
    fields whose mask has that density (a wrong count would land on a neighbouring budget)."""
    g = BlockGeometry(n * 16, n * 16, 16, 16)
    for sink_tokens in (0, 16, 40):
        config = patchattn.get_config("streaming", block_size=16, sink_tokens=sink_tokens)
        for window in (1, 16, 40, 100, 16 * n):
            real = _mask_density(sink_and_window(g, sink_tokens, window), g)
            fields = config.fields_for_density(real, g)
            assert _mask_density(sink_and_window(g, sink_tokens, fields["window"]), g) == pytest.approx(real)
    for sinks in (0, 1, 3):
        config = patchattn.get_config("power", block_size=16, sink_blocks=sinks)
        for local in range(1, n + 1):
            real = _mask_density(power_of_two(g, sinks, local), g)
            fields = config.fields_for_density(real, g)
            assert _mask_density(power_of_two(g, sinks, fields["local_blocks"]), g) == pytest.approx(real)
    for stride in (1, 3, 8):
        config = patchattn.get_config("s2", block_size=16, vert_stride=stride)
        for local in range(1, n + 1):
            real = _mask_density(strided_shards(g, stride, local, stride), g)  # a full cycle of heads
            fields = config.fields_for_density(real, g)
            chosen = strided_shards(g, stride, fields["local_blocks"], fields["vert_stride"])
            assert _mask_density(chosen, g) == pytest.approx(real)


def test_s2_raises_its_stride_below_one_local_block():
    config = patchattn.get_config("s2", density=0.05, block_size=16)
    g = BlockGeometry(4096, 4096, 16, 16)
    fields = config.fields_for_density(0.05, g)
    assert fields["local_blocks"] == 1 and fields["vert_stride"] > config.vert_stride
    got = _mask_density(strided_shards(g, fields["vert_stride"], 1, fields["vert_stride"]), g)
    assert got == pytest.approx(0.05, abs=0.01)


def test_public_entry_points_take_density():
    config = patchattn.get_config("streaming", density=0.3)
    assert config.density == 0.3 and config.window == 1024  # the paper default stays; density wins per call
    assert type(config).from_dict(config.to_dict()) == config
    model = tiny_model("llama")
    handle = patchattn.patch(model, "hip", density=0.1)
    try:
        assert handle.config.density == 0.1
        with torch.no_grad():
            model(input_ids=torch.randint(3, 100, (1, 512)))
        # 8 blocks of 64: sink, local, one searched block and the dense last row are more than 0.1 (hip's floor).
        assert float(model.model.layers[1].self_attn.patchattn.stats["density"]) < 1.0
        assert float(model.model.layers[0].self_attn.patchattn.stats["density"]) == 1.0  # hip's dense first layer
        # At 8k tokens (128 blocks), brute force: rows of min(i + 1, sink + local + k) blocks, the last row dense.
        def reads(k):
            return (sum(min(i + 1, 3 + k) for i in range(127)) + 128) / (128 * 129 / 2)

        best = min(range(1, 129), key=lambda k: abs(reads(k) - 0.1))
        assert resolved_config(handle.config, BlockGeometry(8192, 8192, 64, 64)).top_k == best
        assert abs(reads(best) - 0.1) <= 1 / 129
    finally:
        patchattn.unpatch(model)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan")])
@pytest.mark.parametrize("method", ["streaming", "hip", "moa"])
def test_density_outside_the_range_is_refused(method, bad):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        patchattn.get_config(method, density=bad)


def test_density_and_its_fields_are_not_both_given():
    with pytest.raises(ValueError, match="density sets window per call; do not also pass window"):
        patchattn.get_config("streaming", density=0.3, window=64)
    with pytest.raises(ValueError, match="do not also pass top_k"):
        patchattn.get_config("blocktopk", density=0.3, top_k=4)
    patchattn.get_config("streaming", density=0.3, sink_tokens=16)  # other fields are free


def test_a_method_without_a_mapping_refuses_density():
    from dataclasses import dataclass

    @dataclass(kw_only=True)
    class Unmapped(SparseConfig):
        pass

    assert Unmapped().density is None
    with pytest.raises(ValueError, match="Unmapped cannot honour density"):
        Unmapped(density=0.5)


@pytest.mark.parametrize("method", ["streaming", "blocktopk"])
def test_block_lists_outside_a_model_honour_density(method):
    """Benchmarks build a method's lists with ``block_lists`` on a bare state: the density maps there too."""
    from patchattn.kernels.blocksparse import density_tensor
    from patchattn.masks import BlockGeometry
    from patchattn.methods._sparse import block_lists
    from patchattn.state import PatchContext, PatchState

    spec = get_spec(method)
    q, k = torch.randn(1, 4, 1024, 16), torch.randn(1, 2, 1024, 16)
    g = BlockGeometry(1024, 1024, 16, 16)
    read = {}
    for density in (0.25, 0.5):
        config = patchattn.get_config(method, block_size=16, backend="torch", density=density)
        state = PatchState(config, 0, "text", PatchContext())
        state.method_state = spec.state_cls()
        _, counts = block_lists(state, g, q, k, spec.select, spec.static)
        read[density] = float(density_tensor(counts, 1024, 1024, 16, 16))
        assert state.config is config, "the resolved config is only in effect while the lists are built"
    assert read[0.25] == pytest.approx(0.25, abs=0.02) and read[0.5] == pytest.approx(0.5, abs=0.02)
