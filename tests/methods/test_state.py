"""Per-method state is typed: one ``MethodState`` dataclass per method in ``state.method_state``, nothing added to
``PatchState`` by a method, and only learned parameters registered on the module."""

import pytest
import torch
from pin_cases import PIN_CASES, method_of

import patchattn
from patchattn.registry import all_specs, get_spec
from patchattn.state import MethodState, PatchContext, PatchState
from patchattn.testing import tiny_model

FIXED_ATTRIBUTES = set(vars(PatchState(get_spec("dense").config_cls(), 0, "text", PatchContext())))


def test_every_method_declares_its_state_class_and_a_fresh_state_is_its_type():
    for spec in all_specs():
        state = PatchState(spec.config_cls(), 0, "text", PatchContext())
        if spec.state_cls is None:
            assert state.method_state is None, spec.name
        else:
            assert issubclass(spec.state_cls, MethodState), spec.name
            assert type(state.method_state) is spec.state_cls, spec.name
    assert get_spec("dense").state_cls is None
    # blocktopk and hip share the compressed key cache's type, each in its own state class.
    assert get_spec("blocktopk").state_cls is not get_spec("hip").state_cls
    assert get_spec("blocktopk").state_cls().key_means is None and get_spec("hip").state_cls().key_means is None


@pytest.mark.parametrize("case", sorted({*PIN_CASES, "moh_learned"}))
def test_a_method_adds_nothing_to_the_patch_state_but_its_typed_state(case):
    overrides = {"backend": "torch", "router": "learned"} if case == "moh_learned" else PIN_CASES[case]
    method = method_of(case)
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), patchattn.patched(model, method, **overrides):
        model(input_ids=ids)
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        for layer in model.model.layers:
            state = layer.self_attn.patchattn
            assert set(vars(state)) == FIXED_ATTRIBUTES, case
            assert type(state.method_state) is (get_spec(method).state_cls or type(None)), case
            assert dict(state.named_buffers()) == {}, case
            learned = {"router_weight", "router_bias", "shared_weight", "type_weight"}
            assert set(dict(state.named_parameters())) == (learned if case == "moh_learned" else set()), case


def test_plan_tensors_follow_the_module_like_buffers():
    model = tiny_model("llama")
    with patchattn.patched(model, "moh", backend="torch"):
        state = model.model.layers[0].self_attn.patchattn
        model.to(torch.float64)
        assert state.method_state.shared.dtype == torch.long  # index tensors keep their dtype
    with patchattn.patched(model, "headscale", gains={"0": {"1": 2.0}}):
        state = model.model.layers[0].self_attn.patchattn
        assert state.method_state.gains.dtype == torch.float32
        model.to(torch.float64)
        assert state.method_state.gains.dtype == torch.float64 and state.method_state.gains[1] == 2.0
