"""A patch's life cycle: saved and reloaded with its learned state, handles of reloaded models, nested ``patched``,
copies (deepcopy, pickle, torch.save), patching from two threads, and peft-wrapped models."""

import copy
import io
import pickle
import threading

import pytest
import torch

import patchattn
from patchattn.adapters.hf import _MediaTokenHook
from patchattn.testing import max_abs_diff, tiny_inputs, tiny_model

IDS = torch.randint(3, 100, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _router(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".patchattn." in n}


def _tuned_moh(family="llama"):
    """A tiny model patched with MoH's learned router, moved away from its initialisation (as training would)."""
    model = tiny_model(family)
    patchattn.patch(model, "moh", router="learned", targets="text")
    with torch.no_grad():
        for p in patchattn.api.patch_parameters(model).values():
            p.add_(torch.randn(p.shape))
    return model


def _save_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - 1)} | {"[UNK]": vocab_size - 1}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]"))).save_pretrained(path)


# ---------------------------------------------------------------------------------------------------- item 2: state
def test_learned_router_survives_save_pretrained_and_patchattn_load(tmp_path):
    model = _tuned_moh()
    tuned, want = _router(model), _logits(model)
    model.save_pretrained(tmp_path)
    _save_tokenizer(tmp_path, model.config.vocab_size)

    loaded, _ = patchattn.load(str(tmp_path))
    assert patchattn.get_handle(loaded).config == patchattn.get_config("moh", router="learned")
    assert _router(loaded).keys() == tuned.keys()
    assert all(torch.equal(_router(loaded)[n], tuned[n]) for n in tuned)
    assert torch.equal(_logits(loaded), want)
    # The same with the method named explicitly (the saved config): the saved router is the one it gets.
    again, _ = patchattn.load(str(tmp_path), "moh", router="learned")
    assert all(torch.equal(_router(again)[n], tuned[n]) for n in tuned)
    # Another config is another patch: its router starts fresh.
    other, _ = patchattn.load(str(tmp_path), "moh", router="learned", seed=7)
    assert not torch.equal(_router(other)["model.layers.0.self_attn.patchattn.router_weight"],
                           tuned["model.layers.0.self_attn.patchattn.router_weight"])


@pytest.mark.parametrize("family", ["llama", "llava"])
def test_from_pretrained_then_get_handle_restores_the_router(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model = _tuned_moh(family)
    inputs = tiny_inputs(model, family)
    tuned = _router(model)
    with torch.no_grad():
        want = model(**inputs).logits
    model.save_pretrained(tmp_path)
    auto = AutoModelForImageTextToText if family == "llava" else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path).eval()
    handle = patchattn.get_handle(loaded)
    assert handle is not None and handle.method == "moh" and handle.targets == "text"
    restored = _router(loaded)
    assert restored.keys() == tuned.keys() and all(torch.equal(restored[n], tuned[n]) for n in tuned)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, want)


def test_plain_from_pretrained_then_forward_warns_that_the_router_is_not_restored(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tuned_moh()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with pytest.warns(UserWarning, match=r"learned parameters .*router_weight.*patchattn\.load\(path\)"):
        _logits(loaded)


def test_training_checkpoint_restores_the_patch_parameters(tmp_path):
    from patchattn.train.checkpoint import load_checkpoint, save_checkpoint

    def setup():
        model = tiny_model("llama")
        patchattn.patch(model, "moh", router="learned")
        named = [(n, p) for n, p in model.named_parameters() if ".patchattn." in n]
        optimizer = torch.optim.AdamW([p for _, p in named], lr=0.1)
        return model, named, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    model, named, optimizer, scheduler = setup()
    for _ in range(2):
        model(input_ids=IDS).logits.float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    save_checkpoint(str(tmp_path), 2, named, optimizer, scheduler)
    fresh, fresh_named, fresh_optimizer, fresh_scheduler = setup()
    assert not torch.equal(fresh_named[0][1], named[0][1])
    assert load_checkpoint(str(tmp_path), fresh_named, fresh_optimizer, fresh_scheduler) == 2
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(fresh_named, named, strict=True))
    assert torch.equal(_logits(fresh), _logits(model))


# ---------------------------------------------------------------------------------------------------- item 5: handles
def test_a_reloaded_patched_model_has_a_handle_and_unpatches_to_exact_sdpa(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    reference, keys = _logits(model), set(model.state_dict())
    patchattn.patch(model, "streaming", sink_tokens=4, window=8, backend="torch")
    model.save_pretrained(tmp_path)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    _logits(loaded)  # a call first: states are created lazily, then adopted by get_handle
    handle = patchattn.get_handle(loaded)
    assert handle is not None and handle.method == "streaming" and handle.config.window == 8
    assert patchattn.get_handle(loaded) is handle
    patchattn.unpatch(loaded)
    assert patchattn.get_handle(loaded) is None
    assert loaded.config._attn_implementation == "sdpa" and not hasattr(loaded.config, "patchattn")
    assert set(loaded.state_dict()) == keys
    assert torch.equal(_logits(loaded), reference)


def test_attn_implementation_at_load_gives_a_handle(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("qwen3")
    reference = _logits(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="patchattn_dense").eval()
    assert patchattn.get_handle(loaded).config == patchattn.get_config("dense")
    patchattn.unpatch(loaded)
    assert loaded.config._attn_implementation == "sdpa"
    assert not any(".patchattn" in n for n, _ in loaded.named_modules())
    assert torch.equal(_logits(loaded), reference)


# ---------------------------------------------------------------------------------------------------- item 3: nesting
def test_nested_patched_blocks_restore_the_outer_patch():
    model = _tuned_moh()
    outer = patchattn.get_handle(model)
    router, tuned = _router(model), _logits(model)
    params = list(patchattn.api.patch_parameters(model).values())
    with patchattn.patched(model, "streaming", sink_tokens=4, window=8):
        with patchattn.patched(model, "dense") as inner:
            assert patchattn.get_handle(model) is inner
        assert patchattn.get_handle(model).method == "streaming"
        patchattn.patch(model, "hip")  # a patch made inside a block is undone with it
    assert patchattn.get_handle(model) is outer
    assert list(patchattn.api.patch_parameters(model).values()) == params  # the same objects: an optimiser still holds them
    assert all(torch.equal(a, b) for a, b in zip(_router(model).values(), router.values(), strict=True))
    assert torch.equal(_logits(model), tuned)
    with patchattn.patched(model, "dense"):
        patchattn.unpatch(model)
    assert patchattn.get_handle(model) is outer
    with pytest.raises(ValueError, match="Known methods"), patchattn.patched(model, "nope"):
        pass
    assert patchattn.get_handle(model) is outer and list(patchattn.api.patch_parameters(model).values()) == params
    patchattn.unpatch(model)
    with pytest.raises(RuntimeError), patchattn.patched(model, "dense"), patchattn.patched(model, "streaming"):
        raise RuntimeError("boom")
    assert patchattn.get_handle(model) is None and model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------------- item 4: copies
@pytest.mark.parametrize(("family", "method", "fields"), [
    ("llama", "moh", {"router": "learned"}),
    ("llama", "streaming", {"sink_tokens": 4, "window": 8, "backend": "torch"}),
    ("llava", "dense", {}),
])
def test_a_patched_model_can_be_deep_copied_pickled_and_torch_saved(family, method, fields):
    model = tiny_model(family)
    inputs = tiny_inputs(model, family)
    patchattn.patch(model, method, targets="all" if family == "llava" else "text", **fields)

    def pickled():
        buffer = io.BytesIO()
        torch.save(model, buffer)
        return [pickle.loads(pickle.dumps(model)), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)]

    # transformers' LVLMs install a closure hook on their first call (an unpatched one cannot be pickled after it).
    copies = pickled() if family == "llava" else []
    with torch.no_grad():
        want = model(**inputs).logits  # also records statistics (some are functions evaluated when read)
    copies += [copy.deepcopy(model)] + ([] if family == "llava" else pickled())
    for clone in copies:
        handle = patchattn.get_handle(clone)
        assert handle is not None and handle.method == method and handle is not patchattn.get_handle(model)
        with torch.no_grad():
            assert torch.equal(clone(**inputs).logits, want)
        patchattn.unpatch(clone)
        assert not any(".patchattn." in n for n in clone.state_dict())
        assert not any(isinstance(h, _MediaTokenHook) for m in clone.modules() for h in m._forward_pre_hooks.values())
    assert patchattn.get_handle(model).method == method  # the original is still patched
    if family == "llava":
        assert any(isinstance(h, _MediaTokenHook) for h in model._forward_pre_hooks.values())


# ---------------------------------------------------------------------------------------------------- item 8: threads
def test_patching_one_model_from_several_threads():
    import sys

    model = tiny_model("llama")
    reference, keys = _logits(model), set(model.state_dict())
    errors = []

    def work(method):
        try:
            for _ in range(40):
                patchattn.patch(model, method)
                try:
                    patchattn.unpatch(model)
                except ValueError as err:  # the other thread unpatched first: expected, not a crash
                    assert "not patched" in str(err)
                with patchattn.patched(model, method):
                    pass
        except Exception as err:  # noqa: BLE001 -- reported below
            errors.append(err)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=work, args=(m,)) for m in ("dense", "moh", "streaming", "test_probe")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    if patchattn.get_handle(model) is not None:
        patchattn.unpatch(model)
    assert set(model.state_dict()) == keys and torch.equal(_logits(model), reference)


# ---------------------------------------------------------------------------------------------------- item 11: peft
def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def _train(model, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_patch_unpatch_and_patched_accept_a_peft_model():
    peft_model = _lora(tiny_model("llama"))
    reference = _logits(peft_model)
    handle = patchattn.patch(peft_model, "moh", router="learned")
    base = peft_model.get_base_model()
    assert patchattn.get_handle(peft_model) is handle is patchattn.get_handle(base)
    losses = _train(peft_model)
    assert all(torch.isfinite(torch.tensor(losses)))
    patchattn.unpatch(peft_model)
    assert patchattn.get_handle(base) is None
    with patchattn.patched(peft_model, "streaming", sink_tokens=4, window=8) as inner:
        assert patchattn.get_handle(base) is inner
        assert not torch.equal(_logits(peft_model), reference)  # streaming differs from dense at T=24
    assert patchattn.get_handle(peft_model) is None
    # LoRA trained while patched; unpatched it is the dense model plus the trained LoRA (the first forward differs).
    assert not torch.equal(_logits(peft_model), reference)


def test_a_peft_model_built_on_a_patched_model_trains_and_unpatches():
    base = tiny_model("llama")
    patchattn.patch(base, "moh", router="learned")
    peft_model = _lora(base)
    for p in patchattn.api.patch_parameters(base).values():
        p.requires_grad_(True)  # peft freezes every non-LoRA parameter; the router learns too
    before = _router(base)
    losses = _train(peft_model)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not all(torch.equal(before[n], p) for n, p in _router(base).items())
    assert patchattn.get_handle(peft_model).method == "moh"
    with patchattn.patched(peft_model, "dense"):
        dense = _logits(peft_model)
    assert patchattn.get_handle(peft_model).method == "moh"
    patchattn.unpatch(peft_model)
    assert torch.equal(_logits(peft_model), dense)
    assert not any(".patchattn." in n for n, _ in peft_model.named_parameters())


# ---------------------------------------------------------------------------------------------------- DiTs too
def test_a_patched_dit_nests_copies_and_pickles():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, cross_attention_dim=16, out_channels=8, num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False).eval()
    inputs = {"hidden_states": torch.randn(2, 4, 8, 6), "encoder_hidden_states": torch.randn(2, 5, 32),
              "timestep": torch.tensor([10, 500]), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}

    def run(m):
        with torch.no_grad():
            return m(**inputs).sample

    reference = run(model)
    outer = patchattn.patch(model, "dense", backend="torch")
    states = [model.get_submodule(n).patchattn for n in outer.modules]
    with patchattn.patched(model, "dense") as inner:
        assert patchattn.get_handle(model) is inner and inner.config != outer.config
    assert patchattn.get_handle(model) is outer
    assert all(model.get_submodule(n).patchattn is s for n, s in zip(outer.modules, states, strict=True))
    want = run(model)
    assert max_abs_diff(want, reference) <= 1e-5
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert patchattn.get_handle(clone).config == outer.config and torch.equal(run(clone), want)
        patchattn.unpatch(clone)
        assert torch.equal(run(clone), reference)


def test_a_method_refusing_one_layer_leaves_the_model_untouched(monkeypatch):
    from patchattn.adapters import hf

    model = tiny_model("llama")
    reference, keys = _logits(model), set(model.state_dict())
    make = hf._new_state

    def refuse_layer_one(spec, config, module, index, *args):
        if index == 1 and spec.name == "moh":
            raise ValueError("layer 1 refused")
        return make(spec, config, module, index, *args)

    monkeypatch.setattr(hf, "_new_state", refuse_layer_one)
    with pytest.raises(ValueError, match="layer 1 refused"):
        patchattn.patch(model, "moh", router="learned")
    assert patchattn.get_handle(model) is None and set(model.state_dict()) == keys
    assert torch.equal(_logits(model), reference)
    # On a patched model, the refused patch leaves the previous one in place (the same states).
    first = patchattn.patch(model, "streaming", sink_tokens=4, window=8)
    streaming, states = _logits(model), [model.get_submodule(n).patchattn for n in first.modules]
    with pytest.raises(ValueError, match="layer 1 refused"):
        patchattn.patch(model, "moh", router="learned")
    assert patchattn.get_handle(model) is first and torch.equal(_logits(model), streaming)
    assert [model.get_submodule(n).patchattn for n in first.modules] == states
