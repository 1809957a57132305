"""Seeded fuzz test: random method x setting x family x shape x padding x dtype x prefill/decode.

Each case is drawn from its seed (the test id) and checks one of:

* ``dense``: the method's dense-equivalent setting (``DENSE_EQUIVALENT``) gives the unpatched model's logits
  (and, in fp32, its greedy tokens) on the same padded batch;
* ``sparse``: a setting at which the method really is sparse (``tests/pin_cases.py``, random block size) gives each
  real row of the padded batch the logits it gets alone, and finite numbers everywhere; decoding (fp32) gives each
  row its own tokens, and a static cache the default cache's tokens;
* ``budget``: a sparse method at a random ``density``: runs and stays finite, or refuses the budget with a
  ValueError that names ``density``;
* ``invalid``: a random field set to NaN, infinity or a value out of its range is refused at patch time with a
  ValueError that names the field, and the model is left unpatched.

``PATCHATTN_SLOW=1`` runs 1,000 cases instead of the CI's 120.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random

import pytest
import torch

import patchattn
from patchattn.testing import LLM_FAMILIES, tiny_model
from pin_cases import PIN_CASES, method_of

CASES = 1000 if os.environ.get("PATCHATTN_SLOW") else 120
KINDS = ("dense", "dense", "sparse", "sparse", "budget", "invalid")
# The built-in methods for LLMs (other tests register methods of their own in the same process), in a fixed order.
METHODS = sorted(spec.name for spec in patchattn.list_methods()
                 if spec.forward.__module__.startswith("patchattn.methods") and "llm" in spec.families)
SPARSE = [m for m in METHODS if m in {s.name for s in patchattn.list_methods("sparse")}]
SPARSE_SETTINGS = {method_of(case): {k: v for k, v in o.items() if k != "block_size"}
                   for case, o in PIN_CASES.items() if case == method_of(case)}
TOLERANCE = {torch.float64: 1e-8, torch.float32: 2e-4, torch.bfloat16: 0.1}
# Methods that pick heads (moh) or blocks (landmark) per token by a top-k: a rounding-level difference between the
# batch and the row alone flips a near-tied choice (seen: 1 token in 26 at fp32), so their row-alone checks run in
# float64, where ties at rounding level do not occur.
DISCRETE_ROUTING = {"moh", "landmark"}
# softplus's re-weighting raises weights to the 15th power, which multiplies rounding-level differences between the
# batch and the row alone (2.3e-4 at fp32 on Gemma-2, seed 112): its row-alone checks run in float64 too.
AMPLIFIES_ROUNDING = {"softplus"}
NAN_IN_FLOAT64 = {"gemma2"}  # transformers' Gemma-2 forward itself gives NaN in float64 (unpatched too)
# Methods that replace the attention maths with no setting that gives it back (linear attention): their "dense"
# draws run the padding / decoding checks of the "sparse" kind instead.
NO_DENSE_SETTING = {"lightning"}


@dataclasses.dataclass
class Case:
    kind: str
    method: str
    family: str
    dtype: torch.dtype
    lengths: list[int]
    lefts: list[int]
    width: int
    decode: bool
    overrides: dict
    bad_field: str | None = None  # the field an ``invalid`` case sets to a forbidden value


def draw(seed: int) -> Case:
    rng = random.Random(seed)
    kind, method, family = rng.choice(KINDS), rng.choice(METHODS), rng.choice(LLM_FAMILIES)
    if kind == "budget":
        method = rng.choice(SPARSE)
    if kind == "dense" and method in NO_DENSE_SETTING:
        kind = "sparse"
    dtype = rng.choice([torch.float32, torch.float32, torch.bfloat16])
    if kind == "sparse" and method in DISCRETE_ROUTING | AMPLIFIES_ROUNDING:
        dtype = torch.float64
        if family in NAN_IN_FLOAT64:
            family = "llama"
    lengths = [rng.randint(1, 120) for _ in range(rng.randint(1, 3))]
    width = max(lengths) + rng.choice([0, 0, rng.randint(1, 30)])
    side = rng.choice(["left", "left", "right", "both"])
    lefts = [{"left": width - n, "right": 0, "both": rng.randint(0, width - n)}[side] for n in lengths]
    decode = side == "left" and rng.random() < 0.4
    overrides = _overrides(kind, method, rng)
    bad_field = None
    if kind == "invalid":
        bad_field, value = _invalid_value(patchattn.get_config(method).__class__, rng)
        overrides[bad_field] = value
    return Case(kind, method, family, dtype, lengths, lefts, width, decode, overrides, bad_field)


def _overrides(kind: str, method: str, rng: random.Random) -> dict:
    config_cls = patchattn.get_config(method).__class__
    common = {"backend": "torch"} if "backend" in _field_names(config_cls) else {}
    if "block_size" in _field_names(config_cls):
        common["block_size"] = rng.choice([16, 32])
    if kind == "dense":
        return {**common, **config_cls.DENSE_EQUIVALENT}
    if kind == "sparse":
        return {**common, **SPARSE_SETTINGS.get(method, {})}
    if kind == "budget":
        return {**common, "density": rng.choice([0.1, 0.25, 0.5, 0.9])}
    return common  # invalid: one field is added by ``draw``


def _field_names(config_cls) -> set[str]:
    return {f.name for f in dataclasses.fields(config_cls)}


def _invalid_value(config_cls, rng: random.Random) -> tuple[str, object]:
    """One numeric field with a value its metadata forbids: NaN, infinity, or just outside its range."""
    options = []
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        if f.type in ("float", "float | None") or isinstance(f.default, float):
            options += [(f.name, math.nan), (f.name, math.inf)]
        if meta.get("min") is not None and isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            options.append((f.name, meta["min"] - 1))
        if meta.get("max") is not None and isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            options.append((f.name, meta["max"] + 1))
        if meta.get("choices") and not isinstance(f.default, bool):
            options.append((f.name, "no-such-choice"))
    return rng.choice(options)


def _batch(case: Case):
    gen = torch.Generator().manual_seed(len(case.lengths) * 1000 + case.width)
    rows = [torch.randint(3, 100, (n,), generator=gen) for n in case.lengths]
    ids = torch.zeros(len(rows), case.width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (row, left) in enumerate(zip(rows, case.lefts)):
        ids[i, left:left + len(row)] = row
        mask[i, left:left + len(row)] = 1
    return rows, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _generate(model, ids, mask=None, cache: str | None = None):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                          pad_token_id=0, cache_implementation=cache, output_scores=True,
                          return_dict_in_generate=True)


def _real_diff(a, b, case: Case) -> float:
    return max((a[i, left:left + n].float() - b[i, left:left + n].float()).abs().max().item()
               for i, (n, left) in enumerate(zip(case.lengths, case.lefts)))


def check_dense(model, case: Case, rows, ids, mask, positions):
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        dense_tokens = _generate(model, ids, mask) if case.decode else None
        with patchattn.patched(model, case.method, **case.overrides):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            tokens = _generate(model, ids, mask) if case.decode else None
    diff = _real_diff(out, reference, case)
    assert diff <= TOLERANCE[case.dtype], f"dense-equivalent setting differs from dense by {diff:.2e}"
    if case.decode and case.dtype != torch.bfloat16:
        assert torch.equal(tokens.sequences, dense_tokens.sequences)


def check_sparse(model, case: Case, rows, ids, mask, positions):
    with torch.no_grad(), patchattn.patched(model, case.method, **case.overrides):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        real = mask.bool()
        assert torch.isfinite(out[real]).all()
        for i, (row, left) in enumerate(zip(rows, case.lefts)):
            alone = model(input_ids=row[None]).logits[0]
            diff = (out[i, left:left + len(row)].float() - alone.float()).abs().max().item()
            # bf16: the row alone and the batch may round differently, within the dtype's tolerance
            assert diff <= TOLERANCE[case.dtype], f"row {i}: the padded batch differs from the row alone by {diff:.2e}"
        if case.decode:
            generated = _generate(model, ids, mask)
            assert not any(s.isnan().any() or (s == float("inf")).any() for s in generated.scores)  # EOS is -inf
            if case.dtype != torch.bfloat16:
                for i, row in enumerate(rows):
                    alone = _generate(model, row[None])
                    assert torch.equal(generated.sequences[i, case.width:], alone.sequences[0, len(row):])
                static = _generate(model, ids, mask, cache="static")
                assert torch.equal(static.sequences, generated.sequences), "static cache != default cache"


def check_budget(model, case: Case, rows, ids, mask, positions):
    try:
        handle = patchattn.patch(model, case.method, **case.overrides)
    except ValueError as err:
        assert "density" in str(err), f"refused a density budget without naming it: {err}"
        return
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert torch.isfinite(out[mask.bool()]).all()
    finally:
        assert patchattn.get_handle(model) is handle
        patchattn.unpatch(model)


def check_invalid(model, case: Case, rows, ids, mask, positions):
    with pytest.raises(ValueError) as raised:
        patchattn.patch(model, case.method, **case.overrides)
    assert case.bad_field in str(raised.value), f"the error does not name {case.bad_field!r}: {raised.value}"
    assert patchattn.get_handle(model) is None


CHECKS = {"dense": check_dense, "sparse": check_sparse, "budget": check_budget, "invalid": check_invalid}


@pytest.mark.parametrize("seed", range(CASES))
def test_fuzz_case(seed):
    case = draw(seed)
    model = tiny_model(case.family).to(case.dtype)
    rows, ids, mask, positions = _batch(case)
    try:
        CHECKS[case.kind](model, case, rows, ids, mask, positions)
    except AssertionError as err:
        raise AssertionError(f"{case}: {err}") from err


def test_fuzz_draws_cover_every_method_kind_and_family():
    """The CI's cases reach every method, every kind of check, every family, both dtypes, padding and decoding."""
    drawn = [draw(seed) for seed in range(CASES)]
    assert {c.method for c in drawn} == set(METHODS)
    assert {c.kind for c in drawn} == set(KINDS)
    assert {c.family for c in drawn} == set(LLM_FAMILIES)
    assert {torch.float32, torch.bfloat16} <= {c.dtype for c in drawn}
    assert any(c.decode for c in drawn) and any(min(c.lefts) > 0 for c in drawn)
