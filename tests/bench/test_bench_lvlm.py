"""``patchattn bench lvlm`` on the CPU with tiny models; the real shapes' inputs hold the stated image tokens."""

import csv
import json

import pytest
import torch

from patchattn.bench import lvlm


def test_bench_lvlm_writes_rows_and_environment(tmp_path):
    out = tmp_path / "lvlm.csv"
    assert lvlm.main(["--shapes", "tiny", "--methods", "dense", "--device", "cpu", "--dtype", "float32",
                      "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["shape"], r["method"]) for r in rows] == [("tiny-llava", "dense"), ("tiny-qwen2-vl", "dense")]
    assert all(int(r["image_tokens"]) > 0 and float(r["ms"]) > 0 for r in rows)
    assert "commit" in json.loads((tmp_path / "lvlm.json").read_text())


@pytest.mark.parametrize("name", lvlm.GROUPS["default"] + lvlm.GROUPS["language"])
def test_real_shapes_hold_their_image_tokens(name, monkeypatch):
    shape = lvlm.SHAPES[name]
    # The model is not built (7B parameters): only the inputs are checked, with a stand-in for the model class.
    monkeypatch.setattr("transformers.AutoModelForImageTextToText.from_config", lambda config: config)
    config, inputs = lvlm.build(shape, layers=1)
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == shape.image_tokens
    if "image_grid_thw" in inputs:
        merge = config.vision_config.spatial_merge_size
        assert int(inputs["image_grid_thw"].prod()) // merge**2 == shape.image_tokens
        assert inputs["pixel_values"].shape[0] == int(inputs["image_grid_thw"].prod())
    else:
        v = config.vision_config
        assert (v.image_size // v.patch_size) ** 2 == shape.image_tokens == 576
    assert torch.equal(inputs["input_ids"], lvlm.build(shape, layers=1)[1]["input_ids"])  # same prompt every run
    if shape.vision_layers:  # the language-model rows: a 2-layer tower, one of them full attention
        assert config.vision_config.depth == shape.vision_layers
        assert config.vision_config.fullatt_block_indexes == [shape.vision_layers - 1]


def test_bench_lvlm_refuses_unknown_names():
    with pytest.raises(ValueError, match="Known methods"):
        lvlm.main(["--shapes", "tiny", "--methods", "no_such_method", "--device", "cpu"])
    with pytest.raises(SystemExit, match="unknown shapes"):
        lvlm.main(["--shapes", "llava-9999", "--methods", "dense", "--device", "cpu"])


def test_var_rows_watch_a_dimension_where_none_is_shipped():
    """Without shipped sink dimensions var patches nothing (every layer inactive): the row would time a no-op."""
    for name in lvlm.GROUPS["tiny"]:
        model, _ = lvlm.build(lvlm.SHAPES[name], layers=None)
        overrides, note = lvlm.timed_overrides(model, "var", {})
        from patchattn.methods.var import lookup_sink_dims, sink_dims_table

        shipped = lookup_sink_dims(sink_dims_table(), model.config.get_text_config())
        assert (overrides, note == "") == (({}, True) if shipped else ({"sink_dims": [0]}, False))
        lvlm.patch(model, "var", **overrides, first_layer=0, except_last_layer=False)  # the tiny models: 2 layers
        try:
            active = [m.patchattn.method_state.active for m in model.modules() if hasattr(m, "patchattn")]
            assert any(active)
        finally:
            lvlm.unpatch(model)
    assert lvlm.timed_overrides(None, "var", {"sink_dims": [3]}) == ({"sink_dims": [3]}, "")
    assert lvlm.timed_overrides(None, "vhr", {}) == ({}, "")
