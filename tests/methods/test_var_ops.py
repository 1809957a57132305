"""var's per-layer cost on the host: aten ops issued by one active layer's edit, beside the model's own attention.

Counted on a CPU forward of tiny LLaVA (every text layer active) with a ``TorchDispatchMode``: the ops issued inside
``var_attention`` but not inside ``dense_call`` (the unpatched attention) nor inside a kernel's own code (the
pure-torch reference that a GPU replaces by one launch, or Triton's interpreter).  The per-layer count is the
difference between 4 and 2 layers, halved, so the once-per-forward work (editable rows, padding starts) is not in
it.  Before the one-pass kernel (design note 53) a layer issued 85 ops (96 with left padding) around 4 engine
passes; now 32 around one.
"""

import warnings

import pytest
import torch
from op_counts import MethodOps
from transformers import AutoModelForImageTextToText

import patchattn
from patchattn.methods import var
from patchattn.models import TINY_CONFIGS
from patchattn.state import get_state
from patchattn.testing import left_pad, tiny_inputs

OPTIONS = {"sink_dims": [17], "tau": 4.0, "first_layer": 0, "except_last_layer": False, "summ": 0.05, "rho": 0.3}
MAX_OPS_PER_LAYER = 40  # measured 32, padded or not; 85 / 96 (left-padded) before the one-pass kernel


def _plant(model, inputs, dim=17, value=400.0):
    """A massive activation at ``dim`` on the first real token and two image tokens: every layer finds sinks."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    planted = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(ids.shape[0]):
        planted[b, int(mask[b].argmax())] = True
        planted[b, (ids[b] == model.config.image_token_id).nonzero()[[1, 3], 0]] = True

    def hook(_module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] == planted.shape[1]:
            embeds = embeds.clone()
            embeds[..., dim] += value * planted.to(embeds.dtype)
            kwargs["inputs_embeds"] = embeds
        return args, kwargs

    model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)


def _selected(model) -> list[float]:
    states = [get_state(model.get_submodule(name)) for name in patchattn.get_handle(model).modules]
    return [s.stats["selected"] for s in states if s is not None and s.role == "text"]


def _ops(layers: int, pad, monkeypatch) -> tuple[int, int, list]:
    config = TINY_CONFIGS["llava"]()
    config.get_text_config().num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    inputs = tiny_inputs(model, "llava", batch=2, text_len=40)
    if pad is not None:
        inputs = left_pad(inputs, pad)
    _plant(model, inputs)
    passes = []
    real = var.class_attention
    monkeypatch.setattr(var, "class_attention", lambda *a, **k: passes.append(1) or real(*a, **k))
    with warnings.catch_warnings(), torch.no_grad(), patchattn.patched(model, "var", backend="torch", **OPTIONS):
        warnings.simplefilter("ignore")
        model(**inputs)  # warm: lazy states
        passes.clear()
        with MethodOps("var_attention") as counter:
            model(**inputs)
        selected = _selected(model)
    return sum(counter.ops.values()), len(passes), selected


@pytest.mark.parametrize("pad", [None, [0, 3]], ids=["plain", "left-padded"])
def test_one_pass_and_few_ops_per_active_layer(pad, monkeypatch):
    few, few_passes, selected = _ops(2, pad, monkeypatch)
    many, many_passes, _ = _ops(4, pad, monkeypatch)
    assert min(selected) > 0, "every layer must edit rows, or the count measures nothing"
    assert (few_passes, many_passes) == (2, 4), "one class-mass pass per active layer"
    per_layer = (many - few) / 2
    assert per_layer <= MAX_OPS_PER_LAYER, f"{per_layer} aten ops per active var layer (bound {MAX_OPS_PER_LAYER})"


def test_gradient_path_gives_the_inference_output():
    """With gradients on, the edit is merged out of place (the model's attention output may be saved for its
    backward); the values are those of the in-place inference merge."""
    config = TINY_CONFIGS["llava"]()
    config.get_text_config().num_hidden_layers = 2
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    inputs = tiny_inputs(model, "llava", batch=2, text_len=40)
    _plant(model, inputs)
    with warnings.catch_warnings(record=True) as caught, patchattn.patched(model, "var", **OPTIONS):
        warnings.simplefilter("always")
        with torch.no_grad():
            inference = model(**inputs).logits
        trained = model(**inputs).logits
        assert trained.requires_grad
        trained.sum().backward()
        selected = _selected(model)
    assert min(selected) > 0
    assert torch.equal(trained.detach(), inference)
    said = [str(w.message) for w in caught if "forward only" in str(w.message)]
    assert said and all(m.startswith("patchattn var is training-free") for m in said), "var warns, the kernel not again"
