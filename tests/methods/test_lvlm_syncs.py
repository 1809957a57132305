"""Host-device synchronisations of the LVLM methods per forward: a constant, whatever the number of layers.

At LVLM prefill lengths (hundreds of tokens) a host read in every layer stops the host from queueing the next
layers' kernels, so a forward costs host time plus device time instead of the larger of the two (the first H200
run: var 3.6x, vhr 1.7x, paint 1.8x, composite 1.5x the unpatched model).  The counter (``tests/host_syncs.py``)
sees every aten op of a CPU forward and counts the ones a GPU would wait for; CPU-only reads (the engine's torch
reference) are left out.  Each method is timed against the same model unpatched at 3 and 6 text layers: the extra
reads may not grow with depth.  The input checks (on by default) add one read per prefill forward, not one per
layer: each attention call queues a device flag and the patched root model's forward hook reads them all at once
(``patchattn/checks.py``); a decode step reads nothing.

The counter also counts host data placed on the device (``torch.tensor(..., device=...)``): on a GPU that copy ends
with a stream synchronize, the same wait as a scalar read, yet a CPU run shows no device change.  The media-token
hook made one per forward and PAINT two per image (design note 54); none is left in patchattn's code.
"""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

import patchattn
from patchattn.models import TINY_CONFIGS
from patchattn.testing import tiny_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from host_syncs import SyncCounter

OPTIONS = {  # every layer active, so each layer runs the method's whole path
    "var": {"sink_dims": [17], "tau": 4.0, "first_layer": 0, "except_last_layer": False, "summ": 0.05, "rho": 0.3},
    "vhr": {"last_layers": 100},
    "paint": {"start_layer": 0},
    "composite": {},
}
# Reads per prefill forward that do not depend on the depth (image-token facts, PAINT's token sets, composite's
# block lists), input checks off: the pinned ceiling.  The input checks add one (``CHECKS``).
PER_FORWARD = {"var": 2, "vhr": 1, "paint": 1, "composite": 11}
CHECKS = 1


def _model(family: str, layers: int):
    config = TINY_CONFIGS[family]()
    text = config.get_text_config()
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None):  # Qwen2-VL lists one type per layer
        text.layer_types = (text.layer_types * layers)[:layers]
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config).eval()


def _reads(model, inputs, **kwargs) -> int:
    with torch.no_grad():
        model(**inputs, **kwargs)  # warm: lazy states, caches of earlier prompts
        with SyncCounter() as counter:
            model(**inputs, **kwargs)
    return counter.count


def _extra_reads(family: str, method: str, layers: int) -> int:
    model = _model(family, layers)
    inputs = tiny_inputs(model, family, batch=2, text_len=40)
    base = _reads(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with patchattn.patched(model, method, **OPTIONS[method]):
            return _reads(model, inputs) - base


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_host_reads_per_forward_do_not_grow_with_depth(method, monkeypatch):
    monkeypatch.setenv("PATCHATTN_CHECKS", "0")
    shallow, deep = _extra_reads("llava", method, 3), _extra_reads("llava", method, 6)
    assert shallow == deep, f"{method}: {shallow} host reads at 3 layers, {deep} at 6: a read in every layer"
    assert deep <= PER_FORWARD[method], f"{method}: {deep} host reads per forward"


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_the_input_check_reads_once_per_forward(method, monkeypatch):
    monkeypatch.setenv("PATCHATTN_CHECKS", "0")
    unchecked = _extra_reads("llava", method, 3)
    monkeypatch.setenv("PATCHATTN_CHECKS", "1")
    shallow, deep = _extra_reads("llava", method, 3), _extra_reads("llava", method, 6)
    assert shallow == deep, f"{method}: {shallow} host reads at 3 layers, {deep} at 6: a read in every layer"
    assert deep == unchecked + CHECKS, f"{method}: the input check costs {deep - unchecked} host reads per forward"
    assert deep <= PER_FORWARD[method] + CHECKS, f"{method}: {deep} host reads per forward"


@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_a_decode_step_reads_nothing(method):
    model = _model("llava", 3)
    inputs = tiny_inputs(model, "llava", batch=2, text_len=20)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        with patchattn.patched(model, method, **OPTIONS[method]):
            prefill = model(**inputs, use_cache=True)
            step = {"input_ids": prefill.logits[:, -1:].argmax(-1), "past_key_values": prefill.past_key_values,
                    "attention_mask": torch.ones(2, inputs["input_ids"].shape[1] + 1, dtype=torch.long)}
            with SyncCounter(("patchattn",)) as counter:
                model(**step, use_cache=True)
    assert counter.count == 0, dict(counter.sites)


@pytest.mark.parametrize(("family", "method"), [("llava", m) for m in ("dense", *sorted(OPTIONS))]
                         + [("qwen2_vl", "paint"), ("qwen2_vl", "vhr")])
def test_no_host_data_is_copied_to_the_device(family, method):
    model = _model(family, 3)
    inputs = tiny_inputs(model, family, batch=2, text_len=40)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        with patchattn.patched(model, method, **OPTIONS.get(method, {})):
            model(**inputs)
            with SyncCounter(("patchattn",)) as counter:
                model(**inputs)
    copies = {site: n for site, n in counter.sites.items() if site.startswith("host-copy")}
    assert not copies, f"{method}: host data copied to the device per forward: {copies}"
