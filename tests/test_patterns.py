"""Attention-pattern coverage (after the CAB benchmark's taxonomy), for every method of the package.

For each method and each pattern — causal self, non-causal self, causal cross, non-causal cross — a model that
really uses the pattern is run through the method: a declared pattern must work (dense: exactly the unpatched
model), an undeclared one must raise ``NotImplementedError`` naming the method and the pattern, never fall back.

The models, tiny and random (no downloads): a Llama (causal self-attention; the text backbone of a LLaVA for
LVLM-only methods), the CLIP vision tower of a LLaVA
(non-causal self-attention, ``targets="vision"``), and a PixArt DiT (non-causal self-attention in ``attn1``,
cross-attention from image queries to caption keys in ``attn2``), whose ``attn2`` runs causal in the causal-cross
case (a processor that calls SDPA with ``is_causal=True``, no other change).
"""

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

import patchattn
from patchattn.registry import PATTERNS, all_specs
from patchattn.testing import max_abs_diff, tiny_inputs, tiny_model

TOL = 1e-5
# The package's own methods (test files register throw-away methods too; those are not part of the matrix).
METHODS = sorted(s.name for s in all_specs() if s.forward.__module__.startswith("patchattn.methods"))
MATRIX = [(m, p) for m in METHODS for p in PATTERNS]


def _spec(name):
    return patchattn.registry.get_spec(name)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # methods warn about missing calibrations on random models
        yield


# --------------------------------------------------------------------------------------------------------------
# One runner per pattern: run the model through the method; return (patched output, unpatched output)
# --------------------------------------------------------------------------------------------------------------
def _dit_only(method) -> bool:
    return not {"llm", "lvlm"} & set(_spec(method).families)


@torch.no_grad()
def _causal_self(method):
    if _dit_only(method):  # a DiT whose self-attention runs causal: refused at call time
        return _dit(method, causal_cross=False, causal_self=True)
    family = "llama" if "llm" in _spec(method).families else "llava"  # an LVLM-only method: LLaVA's text backbone
    model = tiny_model(family)
    inputs = tiny_inputs(model, family)
    reference = model(**inputs).logits
    with patchattn.patched(model, method):
        return model(**inputs).logits, reference


@torch.no_grad()
def _noncausal_self(method):
    if _dit_only(method):  # PixArt's attn1: its non-causal self-attention (attn2 is cross-attention)
        return _dit(method, causal_cross=False)
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    vision = model.model.vision_tower
    pixels = inputs["pixel_values"]
    reference = vision(pixel_values=pixels).last_hidden_state
    assert all(not m.is_causal for n, m in vision.named_modules() if n.endswith("self_attn"))
    with patchattn.patched(model, method, targets="vision"):
        return vision(pixel_values=pixels).last_hidden_state, reference


class CausalCrossProcessor:
    """diffusers' AttnProcessor2_0 maths for cross-attention, with ``is_causal=True`` (query i reads keys <= i)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        heads = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        q, k, v = (t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


def _pixart(causal_cross: bool, causal_self: bool = False):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    for block in model.transformer_blocks:
        if causal_cross:
            block.attn2.set_processor(CausalCrossProcessor())
        if causal_self:
            block.attn1.set_processor(CausalCrossProcessor())  # the same maths over its own tokens: causal self
    gen = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(2, 4, 8, 6, generator=gen),
                  "encoder_hidden_states": torch.randn(2, 5, 32, generator=gen),
                  "timestep": torch.tensor([10, 500]), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return model, inputs


@torch.no_grad()
def _dit(method, causal_cross: bool, causal_self: bool = False):
    model, inputs = _pixart(causal_cross, causal_self)
    reference = model(**inputs).sample
    spec = _spec(method)
    pattern = "causal-cross" if causal_cross else "noncausal-cross"
    if pattern not in spec.patterns:
        return _through_dit_adapter(model, inputs, spec, causal_cross), reference
    if "dit" not in spec.families:
        pytest.skip(f"{method} declares {pattern} but not the 'dit' family: no model here reaches it")
    with patchattn.patched(model, method):
        return model(**inputs).sample, reference


def _through_dit_adapter(model, inputs, spec, causal_cross: bool):
    """Hand the method's *declaration* to the DiT adapter with 'dit' added to its families and the other patterns
    PixArt uses granted (dense maths), so the only pattern left to refuse is the one under test — at patch time
    for non-causal cross-attention, at call time for causal (the adapter learns ``is_causal`` from the call)."""
    from patchattn.adapters import diffusers as dit_adapter
    from patchattn.kernels.dense import sdpa_attention

    granted = {"noncausal-self", "noncausal-cross"} if causal_cross else {"noncausal-self"}
    wider = dataclasses.replace(spec, families=(*spec.families, "dit"), forward=sdpa_attention, make_state=None,
                                patterns=tuple(dict.fromkeys((*spec.patterns, *granted))))
    record = dit_adapter.apply(model, wider, spec.config_cls(), "all")
    try:
        return model(**inputs).sample
    finally:
        dit_adapter.remove(model, record)


RUNNERS = {
    "causal-self": _causal_self,
    "noncausal-self": _noncausal_self,
    "causal-cross": lambda method: _dit(method, causal_cross=True),
    "noncausal-cross": lambda method: _dit(method, causal_cross=False),
}


# --------------------------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "pattern"), MATRIX, ids=[f"{m}-{p}" for m, p in MATRIX])
def test_pattern_matrix(method, pattern):
    spec = _spec(method)
    if pattern in spec.patterns:
        out, reference = RUNNERS[pattern](method)
        assert out.shape == reference.shape and torch.isfinite(out).all()
        if method == "dense":
            assert max_abs_diff(out, reference) <= TOL, f"dense must be the unpatched model ({pattern})"
    else:
        with pytest.raises(NotImplementedError, match=rf"(?s){method}.*(?<!non){pattern}"):
            RUNNERS[pattern](method)


def test_block_sparse_methods_are_exact_on_one_block():
    """Causal self-attention over fewer tokens than one block: every causal block-sparse method reads that block,
    so it must be the dense model (the causal path is right, not just running)."""
    sparse = [s.name for s in all_specs() if s.category == "sparse" and s.name in METHODS]
    assert sparse, "no block-sparse methods registered"
    for method in sparse:
        out, reference = _causal_self(method)
        assert max_abs_diff(out, reference) <= TOL, method


def test_every_llm_method_declares_causal_self():
    # A method for LLMs/LVLMs that refused causal self-attention could not be used at all; DiT-only methods
    # (bidirectional attention) declare the non-causal patterns instead.
    assert all("causal-self" in _spec(m).patterns for m in METHODS if not _dit_only(m))
    assert all("noncausal-self" in _spec(m).patterns for m in METHODS if _dit_only(m))


def test_list_patterns_prints_the_declared_matrix(capsys):
    from patchattn.cli import main

    assert main(["list", "--patterns"]) == 0
    out = capsys.readouterr().out
    for method in METHODS:
        row = next(line for line in out.splitlines() if line.split() and line.split()[0] == method
                   and len(line.split()) == 1 + len(PATTERNS))
        cells = row.split()[1:]
        assert cells == ["yes" if p in _spec(method).patterns else "-" for p in PATTERNS], row


def test_dit_methods_without_cross_attention_are_refused_when_patching():
    """The real patch call (not only the call-time check) refuses a DiT with cross-attention."""
    refused = [m for m in METHODS if "dit" in _spec(m).families and "noncausal-cross" not in _spec(m).patterns]
    for method in refused:
        model, _ = _pixart(causal_cross=False)
        with pytest.raises(NotImplementedError, match=rf"{method}.*noncausal-cross"):
            patchattn.patch(model, method)
        assert patchattn.get_handle(model) is None
