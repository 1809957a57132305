"""headscale: gains 1 is dense bit for bit, gains scale exactly the named heads, identity / uniform / zero heads
against eager references (padding, GQA, decode), artifacts (JSON only) and clear errors."""

import json
import pickle
from pathlib import Path

import pytest
import torch

import patchattn
from patchattn.calibrate import artifact, save_json
from patchattn.kernels.dense import eager_attention, sdpa_attention
from patchattn.methods import headscale
from patchattn.testing import left_pad, tiny_model


def _captured(model, inputs, layer=1):
    """The real q/k/v/mask one layer's attention receives (prefill and the first decode step)."""
    from patchattn.calibrate import attention_probe

    calls = []

    def probe(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == layer:
            calls.append((module, query, key, value, attention_mask, kwargs))
        return sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    with attention_probe(model, "headscale_test_probe", probe), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    return calls


def test_default_and_unit_gains_are_dense_bit_for_bit():
    model = tiny_model("llama")
    inputs = left_pad({"input_ids": torch.randint(3, 100, (2, 20))}, [0, 3])
    with torch.no_grad():
        reference = model(**inputs).logits
        with patchattn.patched(model, "headscale"):
            assert torch.equal(model(**inputs).logits, reference)
        with patchattn.patched(model, "headscale", gains={0: [1.0] * 4, "1": {2: 1.0}}):
            assert torch.equal(model(**inputs).logits, reference)


def test_gains_and_modes_against_eager_references_prefill_and_decode():
    model = tiny_model("llama")  # 4 query heads over 2 kv heads
    inputs = left_pad({"input_ids": torch.randint(3, 100, (2, 20))}, [0, 5])
    calls = _captured(model, inputs)
    assert [c[1].shape[2] for c in calls] == [20, 1]
    modes = {1: {0: "uniform", 1: "identity", 3: "zero"}}
    with patchattn.patched(model, "headscale", gains={1: {0: 2.0, 2: 0.5, 3: 7.0}}, modes=modes):
        for module, query, key, value, mask, kwargs in calls:
            out, _ = headscale.headscale_attention(module, query, key, value, mask, **kwargs)
            dense, _ = sdpa_attention(module, query, key, value, mask, **kwargs)
            # uniform = the Retrieval Head paper's masking: zero query, softmax over the visible keys
            zeroed = query.clone()
            zeroed[:, 0] = 0
            uniform, _ = eager_attention(module, zeroed, key, value, mask, **kwargs)
            q_len = query.shape[2]
            real = slice(5, None) if q_len > 1 else slice(None)  # padded rows of sample 1 are free
            torch.testing.assert_close(out[1, real, 0], 2.0 * uniform[1, real, 0], rtol=0, atol=1e-6)
            torch.testing.assert_close(out[0, :, 0], 2.0 * uniform[0, :, 0], rtol=0, atol=1e-6)
            torch.testing.assert_close(out[:, :, 1], value[:, 0, -q_len:], rtol=0, atol=0)  # its own value
            torch.testing.assert_close(out[:, :, 2], 0.5 * dense[:, :, 2], rtol=0, atol=0)
            assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))


def test_gradients_flow_through_scaled_and_replaced_heads():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 12))
    with patchattn.patched(model, "headscale", gains={0: {1: 0.5}}, modes={1: {2: "uniform"}}):
        model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_artifact_round_trip_and_refusals(tmp_path):
    model = tiny_model("llama")
    gains = [[1.0, 0.5, 1.0, 1.0], [1.0, 1.0, 3.0, 1.0]]
    data = artifact("tiny", model.config, "gains", gains, {})
    data["modes"] = [[None, None, None, "zero"], [None] * 4]
    path = str(save_json(data, tmp_path / "gains.json"))
    with patchattn.patched(model, "headscale", gains=path):
        state = model.model.layers[0].self_attn.patchattn
        assert state.method_state.gains.tolist() == gains[0] and state.method_state.modes == {3: "zero"}
    with pytest.raises(ValueError, match=r"heads are ints in \[0, 3\]"):
        patchattn.patch(model, "headscale", gains={0: {4: 2.0}})
    with pytest.raises(ValueError, match=r"one gain per head \(4\), got 3"):
        patchattn.patch(model, "headscale", gains={0: [1.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match="mode must be one of"):
        patchattn.get_config("headscale", modes={0: {0: "mean"}})
    with pytest.raises(ValueError, match="finite number"):
        patchattn.get_config("headscale", gains={0: {0: float("inf")}})
    with pytest.raises(ValueError, match=r"layers are \[0, 1\]"):
        patchattn.patch(model, "headscale", gains={2: {0: 2.0}})
    pickled = tmp_path / "gains.pkl"
    pickled.write_bytes(pickle.dumps(data))
    with pytest.raises(ValueError, match="not a JSON file"):
        patchattn.get_config("headscale", gains=str(pickled))
    broken = tmp_path / "broken.json"
    broken.write_bytes(pickle.dumps(data))
    with pytest.raises(ValueError, match="JSON only"):
        patchattn.get_config("headscale", gains=str(broken))
    data["gains"] = [[1.0] * 4]
    Path(path).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"\[2\]\[4\] nested list"):
        patchattn.get_config("headscale", gains=path)
