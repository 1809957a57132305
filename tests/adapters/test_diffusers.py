"""Every diffusers DiT family: dense changes nothing, the right layout reaches the method, unpatch and save/load are
exact.  Tiny random transformers built from configs (no downloads), batch 2, fp32 on CPU."""

import collections
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import patchattn
from patchattn.kernels.dense import sdpa_attention
from patchattn.state import PatchState

from dit_cases import BATCH, CASES, FAMILIES, expected_layout, run, tiny

TOL = 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Test-only methods
# ----------------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class DiTProbeConfig(patchattn.MethodConfig):
    """Dense attention that records what reached it."""


PROBE_LOG: list = []


@patchattn.register_method("test_dit_probe", config=DiTProbeConfig, category="other", families=("dit",),
                           paper="test probe")
def dit_probe_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """Dense attention recording the layout, the call and the context of each call."""
    context = module.patchattn.context
    PROBE_LOG.append(dict(
        layer=module.patchattn.layer_index, layout=context.layout, q_len=query.shape[2], k_len=key.shape[2],
        batch=query.shape[0], cross=kwargs["cross_attention"], is_causal=kwargs["is_causal"],
        timestep=context.extras.get("timestep"), family=context.family,
    ))
    return sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


@dataclass(kw_only=True)
class SelfOnlyConfig(patchattn.MethodConfig):
    """A method that only knows bidirectional self-attention."""


@patchattn.register_method("test_dit_self_only", config=SelfOnlyConfig, category="other", families=("dit",),
                           paper="test", patterns=("noncausal-self",))
def self_only_attention(module, query, key, value, attention_mask, **kwargs):
    """Dense, but declares no cross-attention support."""
    return sdpa_attention(module, query, key, value, attention_mask, **kwargs)


@dataclass(kw_only=True)
class GainConfig(patchattn.MethodConfig):
    """A method with a learned parameter per module (for the save/load round trip)."""


def _gain_state(module, config, layer_index, role, context):
    state = PatchState(config, layer_index, role, context)
    state.gain = torch.nn.Parameter(torch.ones(()))
    return state


@patchattn.register_method("test_dit_gain", config=GainConfig, category="other", families=("dit",), paper="test",
                           make_state=_gain_state)
def gain_attention(module, query, key, value, attention_mask, **kwargs):
    """Dense attention times a learned scalar."""
    out, weights = sdpa_attention(module, query, key, value, attention_mask, **kwargs)
    return out * module.patchattn.gain, weights


@dataclass(kw_only=True)
class LLMOnlyConfig(patchattn.MethodConfig):
    """A method declared for LLMs only."""


patchattn.register_method("test_dit_llm_only", config=LLMOnlyConfig, category="other", families=("llm",),
                          paper="test")(self_only_attention)


@pytest.fixture
def probe_log():
    PROBE_LOG.clear()
    return PROBE_LOG


def snapshot(model):
    """Everything unpatch must restore: weights, processors (identity), their backends, the config, the hooks."""
    processors = model.attn_processors
    return dict(
        weights={k: v.clone() for k, v in model.state_dict().items()},
        processors={k: id(p) for k, p in processors.items()},
        backends={k: p.__dict__.get("_attention_backend", "class default") for k, p in processors.items()},
        config=dict(model.config),
        hooks=sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    )


def assert_restored(model, before):
    after = snapshot(model)
    assert after["weights"].keys() == before["weights"].keys()
    assert all(torch.equal(after["weights"][k], v) for k, v in before["weights"].items())
    assert {k: v for k, v in after.items() if k != "weights"} == {k: v for k, v in before.items() if k != "weights"}
    assert not any(hasattr(m, "patchattn") for m in model.modules())


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_dense_exact_probe_layout_and_unpatch(family, probe_log):
    model, inputs = tiny(family)
    case = CASES[family]
    reference = run(model, inputs)
    before = snapshot(model)

    handle = patchattn.patch(model, "dense")
    assert handle.family == family and handle.modules
    assert (run(model, inputs) - reference).abs().max() <= TOL

    handle = patchattn.patch(model, "test_dit_probe")  # replaces dense cleanly
    assert torch.equal(run(model, inputs), reference)
    # Called once per attention module, in module order, each with the layout of its role.
    assert [c["layer"] for c in probe_log] == list(range(len(handle.modules)))
    for call, name in zip(probe_log, handle.modules):
        role = case.roles[name.rsplit(".", 1)[-1]]
        text_slices, image_slice = expected_layout(case, role)
        layout = call["layout"]
        assert (layout.text_slices, layout.image_slice, layout.grid) == (text_slices, image_slice, case.grid), name
        n_image = image_slice[1] - image_slice[0]
        assert call["q_len"] == (n_image + case.n_text if role == "joint" else n_image)
        assert call["cross"] is (role == "cross") and call["is_causal"] is False and call["batch"] == BATCH
        assert call["family"] == family and torch.equal(call["timestep"], inputs["timestep"])
        if role == "cross":
            assert call["k_len"] == case.n_text

    patchattn.unpatch(model)
    assert torch.equal(run(model, inputs), reference)
    assert_restored(model, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    model, inputs = tiny(family)
    reference = run(model, inputs)
    handle = patchattn.patch(model, "test_dit_gain")
    for name in handle.modules:
        model.get_submodule(name).patchattn.gain.data.fill_(0.5)
    patched = run(model, inputs)
    assert not torch.allclose(patched, reference)
    model.save_pretrained(tmp_path)

    loaded = patchattn.load_dit(str(tmp_path))
    loaded_handle = patchattn.get_handle(loaded)
    assert loaded_handle is not None and loaded_handle.method == "test_dit_gain"
    assert loaded_handle.modules == handle.modules
    assert torch.equal(run(loaded, inputs), patched)  # config and the patch's own parameter came back

    patchattn.unpatch(loaded)  # an unpatched model no longer claims a patch in its config
    assert "patchattn" not in loaded.config and torch.equal(run(loaded, inputs), reference)
    assert patchattn.repatch_from_config(loaded) is None


def test_patched_context_manager_and_dense_by_config():
    model, inputs = tiny("pixart")
    reference = run(model, inputs)
    before = snapshot(model)
    with patchattn.patched(model, patchattn.get_config("dense")) as handle:
        assert model.config["patchattn"]["method"] == "dense" and len(handle.modules) == 4
        assert torch.equal(run(model, inputs), reference)
    assert_restored(model, before)


def test_pipeline_patches_its_transformer():
    class TinyPipeline(diffusers.DiffusionPipeline):
        def __init__(self, transformer):
            super().__init__()
            self.register_modules(transformer=transformer)

    model, inputs = tiny("flux")
    pipe = TinyPipeline(model)
    reference = run(model, inputs)
    handle = patchattn.patch(pipe, "dense")
    assert handle.family == "flux" and all(n.startswith("transformer.") for n in handle.modules)
    assert torch.equal(run(pipe.transformer, inputs), reference)
    patchattn.unpatch(pipe)
    assert not any(hasattr(m, "patchattn") for m in model.modules())


@pytest.fixture
def global_backend():
    """Tests that switch diffusers' attention backend put the process-wide one back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    previous = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(previous)


def test_sdpa_backend_is_kept_and_stays_exact(global_backend):
    model, inputs = tiny("wan")
    model.set_attention_backend("_native_math")  # ends in F.sdpa under an sdpa_kernel context
    reference = run(model, inputs)
    before = snapshot(model)
    patchattn.patch(model, "dense")
    assert model.blocks[0].attn1.processor._attention_backend == "_native_math"
    assert torch.equal(run(model, inputs), reference)
    patchattn.unpatch(model)
    assert_restored(model, before)


@pytest.mark.filterwarnings("ignore:flex_attention called without")
def test_non_sdpa_backend_is_pinned_then_restored(global_backend):
    model, inputs = tiny("flux")
    model.set_attention_backend("flex")  # never calls F.sdpa: the patch must switch it to native
    reference = run(model, inputs)
    before = snapshot(model)
    patchattn.patch(model, "dense")
    processor = model.transformer_blocks[0].attn.processor
    assert processor._attention_backend == "native"
    assert (run(model, inputs) - reference).abs().max() <= TOL
    # A backend switched behind the patch's back would skip the method: that must fail loudly.
    processor._attention_backend = "flex"
    with pytest.raises(RuntimeError, match="without F.scaled_dot_product_attention"):
        run(model, inputs)
    processor._attention_backend = "native"
    patchattn.unpatch(model)
    assert_restored(model, before)
    assert processor._attention_backend == "flex"


@pytest.mark.parametrize("family", ["pixart", "wan"])
def test_method_without_cross_attention_is_refused(family):
    model, _ = tiny(family)
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match=r"test_dit_self_only.*noncausal-cross.*noncausal-self"):
        patchattn.patch(model, "test_dit_self_only")
    assert patchattn.get_handle(model) is None
    assert_restored(model, before)


def test_self_only_method_runs_where_there_is_no_cross_attention():
    model, inputs = tiny("sd3")
    reference = run(model, inputs)
    patchattn.patch(model, "test_dit_self_only")
    assert torch.equal(run(model, inputs), reference)


def test_unsupported_diffusers_model_names_the_families():
    model = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                  block_out_channels=(8,), norm_num_groups=4, down_block_types=("DownBlock2D",),
                                  up_block_types=("UpBlock2D",))
    with pytest.raises(TypeError, match="FluxTransformer2DModel.*SD3Transformer2DModel.*WanTransformer3DModel"):
        patchattn.patch(model, "dense")


def test_llm_only_method_is_refused_on_a_dit():
    model, _ = tiny("flux")
    with pytest.raises(ValueError, match="'dit'"):
        patchattn.patch(model, "test_dit_llm_only")


def test_example_script_runs(capsys):
    import runpy

    runpy.run_path(str(Path(__file__).parents[2] / "examples" / "patch_dit.py"), run_name="__main__")
    assert "max abs diff" in capsys.readouterr().out


def test_training_with_gradient_checkpointing(probe_log):
    """Gradients match the unpatched model, and the recomputation in backward still gets the right layout."""
    model, inputs = tiny("wan")
    model.train().enable_gradient_checkpointing()

    def grads():
        model.zero_grad()
        model(**inputs).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = grads()
    handle = patchattn.patch(model, "test_dit_probe")
    patched = grads()
    assert patched.keys() == reference.keys() and all(torch.equal(patched[k], reference[k]) for k in reference)
    assert len(probe_log) == 2 * len(handle.modules)  # forward, then the recomputation during backward
    assert all(c["layout"].grid == CASES["wan"].grid for c in probe_log)


def test_counts_calls_per_forward(probe_log):
    """Two forwards -> two calls per module (the hooks stay for the whole patch, not one forward)."""
    model, inputs = tiny("cogvideox")
    handle = patchattn.patch(model, "test_dit_probe")
    run(model, inputs)
    run(model, inputs)
    assert collections.Counter(c["layer"] for c in probe_log) == {i: 2 for i in range(len(handle.modules))}


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_dit_compiles_in_one_graph(family):
    """torch.compile of a patched transformer: no graph break (the redirect's mode is traced; the input hook that
    reads the timestep runs eagerly before the graph); the compiled output equals eager."""
    import torch._dynamo as dynamo

    model, inputs = tiny(family)
    reference = run(model, inputs)
    patchattn.patch(model, "dense")
    dynamo.reset()
    explain = dynamo.explain(model)(**inputs)
    assert explain.graph_break_count == 0, [b.reason.splitlines()[0] for b in explain.break_reasons]
    if family not in ("flux", "sd3"):  # one dispatcher family and one direct-SDPA family run compiled (slow on CPU)
        return
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        out = compiled(**inputs).sample
    assert (out - reference).abs().max() <= TOL
    dynamo.reset()
