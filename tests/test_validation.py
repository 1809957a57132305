"""Bad input is refused with an error naming the method, the field, the value and what is allowed (issue 19, item 6).

The sweep over the config fields is generated from each registered method's field metadata (``option(min=, max=,
choices=, index=)`` and the annotations), so a method added later is covered without editing this file.
"""

import dataclasses
import json
import math
import typing
import warnings

import pytest
import torch

import patchattn
from patchattn.artifacts import load_artifact
from patchattn.calibrate import save_json
from patchattn.config import MAX_INT, MethodConfig, check_model_fit, model_dims
from patchattn.methods import act, duo, headscale, moa
from patchattn.testing import tiny_model

NON_FINITE = (float("nan"), float("inf"), float("-inf"))


def _fields():
    """(method, field, annotation, metadata) of every field of every registered method's config."""
    for spec in patchattn.list_methods():
        hints = typing.get_type_hints(spec.config_cls)
        for f in dataclasses.fields(spec.config_cls):
            yield pytest.param(spec.name, f.name, hints[f.name], f.metadata, id=f"{spec.name}.{f.name}")


def _takes(annotation, kind) -> bool:
    """Whether ``kind`` (int or float) is one of the annotation's types."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) is not None else (annotation,)
    return kind in options


def _bad_values(annotation, meta) -> list:
    """Values the field must refuse, from its metadata: non-finite numbers (as the value and inside a list), the
    numbers just outside its range, an integer above the int32 ceiling, a value outside its choices."""
    bad = [*NON_FINITE, [float("nan")]]
    step = 1 if _takes(annotation, int) and not _takes(annotation, float) else 0.5
    if meta.get("min") is not None:
        bad.append(meta["min"] - step)
    if meta.get("max") is not None:
        bad.append(meta["max"] + step)
    elif _takes(annotation, int):
        bad.append(MAX_INT + 1)
    if meta.get("choices") is not None:
        bad.append("not-a-choice")
    return bad


def _make(method: str, **fields) -> MethodConfig:
    return patchattn.get_config(method, **fields)


@pytest.mark.parametrize("method,name,annotation,meta", list(_fields()))
def test_every_config_field_refuses_non_finite_and_out_of_range_values(method, name, annotation, meta):
    for value in _bad_values(annotation, meta):
        with pytest.raises(ValueError) as err:
            _make(method, **{name: value})
        message = str(err.value)
        assert f"{method}:" in message and name in message, (value, message)
        shown = repr(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
        assert shown in message, (value, message)


@pytest.mark.parametrize("method,name,annotation,meta", list(_fields()))
def test_out_of_range_errors_say_what_is_allowed(method, name, annotation, meta):
    for bound, outside in (("min", -1), ("max", 1)):
        if meta.get(bound) is None:
            continue
        step = 1 if _takes(annotation, int) and not _takes(annotation, float) else 0.5
        with pytest.raises(ValueError) as err:
            _make(method, **{name: meta[bound] + outside * step})
        limit = meta[bound]
        words = {str(limit), f"{limit:g}"}  # "1.0" from option metadata, "1" in the density range "(0, 1]"
        assert any(w in str(err.value) for w in words), str(err.value)


def test_the_values_of_the_issue_are_refused_before_patching():
    cases = [("moa", "density"), ("blocktopk", "mass"), ("longlora", "group_size_ratio"),
             ("duo", "retrieval_fraction"), ("moh", "active_ratio"), ("act", "beta")]
    model = tiny_model("llama")
    for method, name in cases:
        with pytest.raises(ValueError, match=rf"{method}: \w+Config\.{name} must be .*got nan"):
            patchattn.patch(model, method, **{name: float("nan")})
        assert patchattn.get_handle(model) is None
    with pytest.raises(ValueError, match=r"balance_coef must be a finite number >= 0.0, got inf"):
        patchattn.get_config("moh", balance_coef=float("inf"))


def test_index_fields_hold_integers():
    with pytest.raises(ValueError, match=r"streaming: StreamingConfig.dense_layers must hold layer indices"):
        patchattn.get_config("streaming", dense_layers=[0.5])
    with pytest.raises(ValueError, match=r"dense_layers must hold layer indices"):
        patchattn.get_config("hip", dense_layers=[True])
    with pytest.raises(ValueError, match=r"moh: MoHConfig.shared_heads: head index -1"):
        patchattn.get_config("moh", shared_heads=[-1])
    with pytest.raises(ValueError, match=r"shared_heads must be a count >= 0"):
        patchattn.get_config("moh", shared_heads=-2)


# ---- consistency with the model, checked by patch() before anything changes --------------------------------------
@pytest.mark.parametrize("method,fields,words", [
    ("streaming", {"dense_layers": [5]}, ["dense_layers", "layer index 5", "has 2 layers", "[0, 1]"]),
    ("hip", {"dense_layers": [0, 2]}, ["dense_layers", "layer index 2", "[0, 1]"]),
    ("longlora", {"dense_layers": [9]}, ["dense_layers", "layer index 9", "[0, 1]"]),
    ("act", {"heads": {"5": [0]}}, ["ACTConfig.heads", "layer 5", "[0, 1]"]),
    ("act", {"heads": {"1": [0, 4]}}, ["ACTConfig.heads['1']", "head index 4", "[0, 3]"]),
    ("headscale", {"gains": {"3": {"0": 0.5}}}, ["HeadScaleConfig.gains", "layer 3", "[0, 1]"]),
    ("headscale", {"modes": {"0": {"7": "zero"}}}, ["HeadScaleConfig.modes['0']", "head index 7", "[0, 3]"]),
    ("moh", {"shared_heads": [1, 6]}, ["MoHConfig.shared_heads", "head index 6", "[0, 3]"]),
    ("moh", {"shared_heads": 9}, ["MoHConfig.shared_heads", "9", "[0, 4]", "4 heads"]),
])
def test_indices_the_model_does_not_have_are_refused_at_patch_time(method, fields, words):
    model = tiny_model("llama")  # 2 layers, 4 heads
    with pytest.raises(ValueError) as err:
        patchattn.patch(model, method, **fields)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert patchattn.get_handle(model) is None
    assert not any(hasattr(layer.self_attn, "patchattn") for layer in model.model.layers)
    assert model.config._attn_implementation == "sdpa"


def test_indices_the_model_has_are_accepted():
    model = tiny_model("llama")
    patchattn.patch(model, "streaming", dense_layers=[1], backend="torch")
    patchattn.patch(model, "act", heads={"1": [0, 3]}, backend="torch")
    patchattn.patch(model, "moh", shared_heads=[0, 3], backend="torch")
    patchattn.unpatch(model)


def test_a_refused_config_leaves_the_previous_patch_in_place():
    model = tiny_model("llama")
    first = patchattn.patch(model, "streaming", backend="torch")
    with pytest.raises(ValueError, match="layer index 4"):
        patchattn.patch(model, "streaming", dense_layers=[4])
    assert patchattn.get_handle(model) is first


def test_model_dims_follow_the_targets_of_a_vision_language_model():
    model = tiny_model("gemma3")  # text: 3 layers x 4 heads, vision tower: 2 layers x 2 heads
    assert model_dims(model, "text") == {"num_layers": 3, "num_heads": 4}
    assert model_dims(model, "vision") == {"num_layers": 2, "num_heads": 2}
    assert model_dims(model, "all") == {"num_layers": 3, "num_heads": 4}
    check_model_fit(patchattn.get_config("streaming", dense_layers=[2]), model, "text")
    with pytest.raises(ValueError, match=r"layer index 2 does not exist in this model, which has 2 layers"):
        check_model_fit(patchattn.get_config("streaming", dense_layers=[2]), model, "vision")
    assert model_dims(torch.nn.Linear(2, 2)) == {"num_layers": None, "num_heads": None}  # unknown: not checked


# ---- artifacts ---------------------------------------------------------------------------------------------------
def _artifact(tmp_path, payload, rows, layers=2, heads=4, name="artifact.json", raw=None):
    path = tmp_path / name
    text = raw if raw is not None else json.dumps(
        {"model": "tiny", "num_layers": layers, "num_heads": heads, payload: rows, "meta": {}})
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_in_artifacts_are_refused_with_their_place(tmp_path, literal):
    rows = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]]
    text = json.dumps({"model": "tiny", "num_layers": 2, "num_heads": 4, "scores": rows, "meta": {}})
    path = _artifact(tmp_path, "scores", None, raw=text.replace("0.7", literal))
    with pytest.raises(ValueError, match=r"scores\[1\]\[2\] is -?(nan|inf); allowed: finite numbers only"):
        duo.load_scores(path)
    with pytest.raises(ValueError, match=r"scores\[1\]\[2\]"):
        patchattn.patch(tiny_model("llama"), "duo", scores=path)


def test_moa_plan_rules_are_bounded(tmp_path):
    good = [[[16.0, 0.5]] * 4] * 2
    assert moa.load_plan(_artifact(tmp_path, "rules", good))["rules"] == good
    for rule, words in [([1e300, 0.5], ["rules[1][3]", "alpha 1e+300 is out of range", str(moa.MAX_ALPHA)]),
                        ([0.0, 1.5], ["rules[1][3]", "beta 1.5 is out of range", "[0.0, 1.0]"]),
                        ([0.0, -0.1], ["beta -0.1"]),
                        ([0.0, True], ["rules[1][3]", "is [0.0, True]"]),
                        ([0.0], ["rules[1][3]", "is [0.0];"])]:
        rows = [[[16.0, 0.5]] * 4, [[16.0, 0.5]] * 3 + [rule]]
        path = _artifact(tmp_path, "rules", rows, name=f"plan{abs(hash(str(rule)))}.json")
        with pytest.raises(ValueError) as err:
            patchattn.patch(tiny_model("llama"), "moa", plan=path)
        assert all(w in str(err.value) for w in words), str(err.value)


def test_artifact_dimensions_must_be_positive_integers(tmp_path):
    for layers in (0, -1, True, 2.0):
        text = json.dumps({"model": "tiny", "num_layers": layers, "num_heads": 4, "act_heads": [], "meta": {}})
        path = _artifact(tmp_path, "act_heads", None, raw=text, name=f"act{layers!s}.json")
        with pytest.raises(ValueError, match=r"'num_layers' must be a positive integer, got"):
            load_artifact(path, "act_heads", "ACT head list")


def test_act_head_lists_and_head_gains_refuse_bad_entries(tmp_path):
    with pytest.raises(ValueError, match="must be 0 or 1"):
        act.load_heads(_artifact(tmp_path, "act_heads", [[0, 1, 0, 2], [0, 0, 0, 0]], name="act.json"))
    raw = json.dumps({"model": "tiny", "num_layers": 2, "num_heads": 4, "gains": [[1.0] * 4, [1.0] * 4], "meta": {}})
    path = _artifact(tmp_path, "gains", None, raw=raw.replace("1.0]", "NaN]", 1), name="gains.json")
    with pytest.raises(ValueError, match=r"gains\[0\]\[3\] is nan"):
        headscale.load_gains(path)


def test_calibration_results_with_nan_are_not_written(tmp_path):
    out = tmp_path / "plan.json"
    with pytest.raises(ValueError, match=r"calibration result for .*\['scores'\]\[0\]\[1\] is nan"):
        save_json({"model": "tiny", "num_layers": 1, "num_heads": 2, "scores": [[0.5, float("nan")]], "meta": {}}, out)
    assert not out.exists()
    save_json({"model": "tiny", "num_layers": 1, "num_heads": 2, "scores": [[0.5, 0.25]], "meta": {}}, out)
    assert json.loads(out.read_text())["scores"] == [[0.5, 0.25]]


def test_shipped_artifacts_still_load():
    for name in ("smollm2",):
        assert moa.load_plan(name)["num_layers"] == 30
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert duo.load_scores("smollm2_retrieval")["num_heads"] == 9
        assert act.load_heads("smollm2_act")["num_layers"] == 30


# ---- transformers names (item 14) ----------------------------------------------------------------------------------
def test_a_mistyped_patchattn_name_lists_the_registered_names():
    names = [spec.hf_name for spec in patchattn.list_methods()]
    for call in (lambda: patchattn.registry.get_spec("patchattn_hipp"),
                 lambda: patchattn.registry.hf_attn_implementation("patchattn_hipp"),
                 lambda: patchattn.registry.hf_attn_implementation("hipp"),
                 lambda: patchattn.patch(tiny_model("llama"), "patchattn_hipp")):
        with pytest.raises(ValueError) as err:
            call()
        message = str(err.value)
        assert "'patchattn_hipp'" in message and "Did you mean 'patchattn_hip'?" in message, message
        assert all(name in message for name in names), message
    assert patchattn.registry.hf_attn_implementation("hip") == "patchattn_hip"
    assert patchattn.registry.hf_attn_implementation("patchattn_moa") == "patchattn_moa"


def test_transformers_loads_through_the_checked_name():
    """transformers refuses an unknown ``attn_implementation`` itself, listing only its own implementations (it checks
    before any patchattn code runs); ``hf_attn_implementation`` is where a typo gets the patchattn names."""
    config = tiny_model("llama").config
    cls = type(tiny_model("llama"))
    with pytest.raises(ValueError, match="patchattn_hip"):
        cls._from_config(config, attn_implementation=patchattn.registry.hf_attn_implementation("hipp"))
    model = cls._from_config(config, attn_implementation=patchattn.registry.hf_attn_implementation("dense"))
    assert model.config._attn_implementation == "patchattn_dense"


def test_an_odd_longlora_group_is_refused_when_it_must_shift_by_half():
    with pytest.raises(ValueError, match=r"longlora: LongLoRAConfig.group_size must be even with shift=True .*got 17"):
        patchattn.get_config("longlora", group_size=17)
    assert patchattn.get_config("longlora", group_size=17, shift=False).group_size == 17
