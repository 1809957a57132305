"""The NaN/Inf input check reads the host once per model forward, whatever the depth, and still names the layer.

Each prefill attention call queues a device flag (``checks.finite_flags``); the patched root model's hooks
(``checks.InputCheckHooks``) read all of them once when its forward ends.  The reads are counted on the CPU by
``tests/host_syncs.py``; NaN/Inf is planted in one layer's projection output (a forward hook on ``q_proj`` /
``k_proj`` / ``v_proj``), so only that layer's one tensor is non-finite there and every later layer sees NaN
queries: the error must name the first one.  Before this change the check read once per layer and its message
named no layer, so ``test_host_reads_do_not_grow_with_depth`` and the planted-NaN tests fail on that code.
"""

import sys
import warnings
from pathlib import Path

import pytest
import torch

import patchattn
from patchattn import checks
from patchattn.models import TINY_CONFIGS, tiny_model
from patchattn.state import get_state
from patchattn.testing import tiny_inputs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_syncs import SyncCounter


def _llm(layers: int = 3):
    from transformers import AutoModelForCausalLM

    config = TINY_CONFIGS["llama"]()
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _ids(model, length: int = 40, batch: int = 2):
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))


def _reads(model, **inputs) -> int:
    with torch.no_grad():
        model(**inputs)  # warm: lazily made states
        with SyncCounter() as counter:
            model(**inputs)
    return counter.count


def _extra_reads(method: str, layers: int) -> int:
    model = _llm(layers)
    ids = _ids(model)
    base = _reads(model, input_ids=ids)
    with patchattn.patched(model, method):
        return _reads(model, input_ids=ids) - base


@pytest.mark.parametrize("method", ["dense", "streaming"])
def test_host_reads_do_not_grow_with_depth(method, monkeypatch):
    """The check's cost (reads with it on minus off) is one read per forward at 3 and at 6 layers; ``dense`` reads
    nothing else, so its patched forward reads exactly one more than the unpatched model.  (``streaming`` has
    per-layer reads of its own, on the host path of this tiny geometry: not the check's, so subtracted.)"""
    cost = {}
    for layers in (3, 6):
        monkeypatch.setenv("PATCHATTN_CHECKS", "0")
        unchecked = _extra_reads(method, layers)
        monkeypatch.setenv("PATCHATTN_CHECKS", "1")
        cost[layers] = _extra_reads(method, layers) - unchecked
        if method == "dense":
            assert unchecked == 0
    assert cost == {3: 1, 6: 1}, f"{method}: the check's host reads per forward by depth: {cost}"


def _poison(model, layer: int, proj: str, value: float, lvlm: bool = False):
    """A forward hook making one element of ``layers[layer].self_attn.<proj>``'s output ``value``."""
    layers = model.model.language_model.layers if lvlm else model.model.layers
    target = getattr(layers[layer].self_attn, proj)

    def hook(_module, _args, output):
        output = output.clone()
        output[0, 1, 3] = value
        return output

    return target.register_forward_hook(hook)


def _open_queues(model) -> list:
    context = get_state(model.model.layers[0].self_attn).context
    return context.extras.get(getattr(checks, "PENDING_KEY", None), [])


CASES = [(1, "v_proj", float("nan"), "value"), (2, "k_proj", float("inf"), "key"),
         (0, "q_proj", float("-inf"), "query")]


@pytest.mark.parametrize("layer,proj,bad,tensor", CASES)
def test_planted_nan_names_the_layer_and_tensor_then_a_clean_forward_works(layer, proj, bad, tensor):
    model = _llm(4)
    ids = _ids(model)
    patchattn.patch(model, "dense")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        hook = _poison(model, layer, proj, bad)
        with pytest.raises(ValueError, match=rf"dense: the attention {tensor} of layer {layer} contains NaN or Inf"):
            model(input_ids=ids)
        hook.remove()
        assert _open_queues(model) == [], "a queue of the failed forward is still open"
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_an_error_mid_forward_closes_the_queue():
    """A forward that raises after a layer queued a bad flag: its own error goes on, nothing leaks into the next."""
    model = _llm(3)
    ids = _ids(model)
    patchattn.patch(model, "dense")

    def boom(*_):
        raise RuntimeError("boom")

    nan = _poison(model, 0, "v_proj", float("nan"))
    crash = model.model.layers[2].register_forward_pre_hook(boom)
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        model(input_ids=ids)
    nan.remove(), crash.remove()
    assert _open_queues(model) == []
    with torch.no_grad(), SyncCounter() as counter:
        logits = model(input_ids=ids).logits
    assert counter.count == 1, dict(counter.sites)
    assert torch.isfinite(logits).all()


def test_a_decode_step_reads_nothing_and_generate_reads_once_more():
    model = _llm(3)
    ids = _ids(model, 20, batch=1)
    with torch.no_grad(), SyncCounter() as counter:
        base_tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
    base = counter.count
    with patchattn.patched(model, "dense"), torch.no_grad():
        with SyncCounter() as counter:
            tokens = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert counter.count == base + 1, dict(counter.sites)  # the prefill's one read; no decode step reads
        prefill = model(input_ids=ids, use_cache=True)
        with SyncCounter(("patchattn",)) as counter:
            model(input_ids=ids[:, -1:], past_key_values=prefill.past_key_values, use_cache=True)
        assert counter.count == 0, dict(counter.sites)
    assert torch.equal(tokens, base_tokens)


def test_generate_raises_on_planted_nan():
    model = _llm(3)
    patchattn.patch(model, "dense")
    _poison(model, 1, "k_proj", float("nan"))
    with torch.no_grad(), pytest.raises(ValueError, match="the attention key of layer 1"):
        model.generate(_ids(model, 20, batch=1), max_new_tokens=2, do_sample=False)


def test_a_peft_wrapper_reads_once_per_forward():
    peft = pytest.importorskip("peft")
    model = _llm(3)
    ids = _ids(model)
    base = _reads(model, input_ids=ids)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    patchattn.patch(wrapped, "dense")
    assert _reads(wrapped, input_ids=ids) == base + 1
    _poison(model, 2, "v_proj", float("nan"))
    with torch.no_grad(), pytest.raises(ValueError, match="the attention value of layer 2"):
        wrapped(input_ids=ids)


def test_a_model_loaded_patched_checks_each_call_until_get_handle():
    """No ``patch`` call, so no root hooks: the check reads at once (one read per layer); ``get_handle`` adds the
    hooks and the reads become one per forward."""
    model = tiny_model("llama", attn_implementation="patchattn_dense")
    layers = model.config.num_hidden_layers
    ids = _ids(model)
    with torch.no_grad():
        model(input_ids=ids)  # makes the states
        hook = _poison(model, 1, "v_proj", float("nan"))
        with pytest.raises(ValueError, match="the attention value of layer 1"):
            model(input_ids=ids)
        hook.remove()
        with SyncCounter() as counter:
            model(input_ids=ids)
        assert counter.count == layers, dict(counter.sites)
        patchattn.get_handle(model)
        with SyncCounter() as counter:
            model(input_ids=ids)
        assert counter.count == 1, dict(counter.sites)


@pytest.mark.parametrize("targets", ["text", "all"])
def test_lvlm_planted_nan_names_the_text_layer_then_a_clean_forward_works(targets):
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", batch=2, text_len=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patchattn.patch(model, "dense", targets=targets)
    with torch.no_grad():
        expected = model(**inputs).logits
        hook = _poison(model, 1, "v_proj", float("nan"), lvlm=True)
        with pytest.raises(ValueError, match=r"dense: the attention value of layer 1 contains NaN or Inf"):
            model(**inputs)
        hook.remove()
        with SyncCounter(("patchattn",)) as counter:
            torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
    assert counter.count == 1, dict(counter.sites)


def test_lvlm_planted_nan_in_the_vision_tower_names_it():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", batch=2, text_len=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patchattn.patch(model, "dense", targets="vision")
    first = next(m for m in model.model.vision_tower.modules() if get_state(m) is not None)  # vision layer 0
    proj = first.v_proj

    def hook(_module, _args, output):
        output = output.clone()
        output[0, 1, 3] = float("nan")
        return output

    proj.register_forward_hook(hook)
    with torch.no_grad(), pytest.raises(ValueError, match="the attention value of vision layer 0"):
        model(**inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_flags_equal_a_full_isfinite(dtype):
    """Against ``isfinite(t).all()`` per tensor: NaN, +Inf, -Inf anywhere, values near the dtype's largest (whose sum
    would overflow: no false positive), an empty tensor."""
    gen = torch.Generator().manual_seed(0)
    big = torch.finfo(dtype).max
    for trial in range(40):
        tensors = [torch.randn(2, 3, 7, 5, generator=gen).to(dtype) for _ in range(3)]
        tensors[trial % 3] = tensors[trial % 3] * 0 + big * (1 - 2 * (trial % 2))  # huge but finite
        for t in tensors:
            if torch.rand((), generator=gen) < 0.5:
                i = torch.randint(t.numel(), (), generator=gen)
                t.view(-1)[i] = (float("nan"), float("inf"), float("-inf"))[trial % 3]
        want = [bool(torch.isfinite(t).all()) for t in tensors]
        assert checks.finite_flags(tensors).tolist() == want
    assert checks.finite_flags([torch.empty(0, 2), torch.ones(2)]).tolist() == [True, True]


BAD = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("proj,tensor", [("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")])
def test_each_non_finite_value_in_each_tensor_is_named(proj, tensor, bad):
    """NaN, +Inf and -Inf in each of query, key and value (design note 57's 3-op test of the ends): the error names
    that tensor of that layer, on the deferred check (``patch``) and on the immediate one (a submodule called alone)."""
    model = _llm(3)
    ids = _ids(model)
    patchattn.patch(model, "dense")
    hook = _poison(model, 1, proj, BAD[bad])
    with torch.no_grad(), pytest.raises(ValueError, match=rf"dense: the attention {tensor} of layer 1 contains"):
        model(input_ids=ids)
    assert _open_queues(model) == []
    layer = model.model.layers[1]
    hidden = torch.randn(2, 10, model.config.hidden_size)
    rotary = model.model.rotary_emb(hidden, torch.arange(10)[None].expand(2, -1))
    with torch.no_grad(), pytest.raises(ValueError, match=rf"dense: the attention {tensor} of layer 1 contains"):
        layer.self_attn(hidden, position_embeddings=rotary, attention_mask=None)
    hook.remove()


@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("where", [0, 1, 2])
def test_finite_flags_see_an_inf_behind_a_large_finite_end(where, bad):
    """A -Inf among values up to the dtype's largest (a max alone would miss it), a +Inf among values down to the
    dtype's lowest (a min alone would miss it), a NaN among both: only that tensor is flagged."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        info = torch.finfo(dtype)
        tensors = [torch.randn(2, 4, 9, 8).to(dtype) for _ in range(3)]
        for t in tensors:
            t.view(-1)[0], t.view(-1)[-1] = info.max, info.min  # both ends huge and finite
        tensors[where].view(-1)[7] = BAD[bad]
        assert checks.finite_flags(tensors).tolist() == [i != where for i in range(3)], (dtype, bad)
    both = torch.tensor([1.0, float("inf"), float("-inf")])
    assert checks.finite_flags([both, torch.ones(3), torch.ones(3)]).tolist() == [False, True, True]


def test_checks_off_at_the_start_of_a_forward_compute_nothing(monkeypatch):
    """``PATCHATTN_CHECKS=0`` is read once per forward (the hooks' queue): no reduction runs in any layer and a
    planted NaN is not reported; back on, the next forward reports it."""
    model = _llm(3)
    ids = _ids(model)
    patchattn.patch(model, "dense")
    hook = _poison(model, 1, "v_proj", float("nan"))
    calls = []
    monkeypatch.setattr(checks, "finite_flags", lambda tensors: calls.append(1) or torch.ones(3, dtype=torch.bool))
    monkeypatch.setenv("PATCHATTN_CHECKS", "0")
    with torch.no_grad():
        model(input_ids=ids)
    assert calls == [] and _open_queues(model) == []
    monkeypatch.undo()
    with torch.no_grad(), pytest.raises(ValueError, match="the attention value of layer 1"):
        model(input_ids=ids)
    hook.remove()
