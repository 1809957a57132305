"""Every method computes what it computed when ``tests/data/method_pins.safetensors`` was written.

Refactors must not change behaviour: prefill logits within 1e-4 (a different block list moves them by ~1e-2),
each layer's density exactly (it counts the blocks read) and the greedy tokens of decode steps through the cache.
A change that is *meant* to alter a method regenerates the file (``python tests/data/make_pins.py``) in its commit.
"""

import os

import pytest
import torch
from safetensors.torch import load_file

from pin_cases import PIN_CASES, run_case

PINS = load_file(os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "method_pins.safetensors"))


@pytest.mark.parametrize("case", sorted(PIN_CASES))
def test_method_output_is_pinned(case):
    got = run_case(case)
    torch.testing.assert_close(got["density"], PINS[f"{case}/density"], atol=1e-9, rtol=0, equal_nan=True)
    torch.testing.assert_close(got["logits"], PINS[f"{case}/logits"], atol=1e-4, rtol=0)
    assert got["tokens"].tolist() == PINS[f"{case}/tokens"].tolist()


def test_pinned_cases_are_sparse_where_they_should_be():
    """The pins mean something only where the methods really skip blocks."""
    for case in ("streaming", "power", "s2", "blocktopk", "blocktopk_fixed", "hip", "hyper", "moa", "duo"):
        density = PINS[f"{case}/density"]
        assert (density < 1.0).any(), case
