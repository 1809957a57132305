"""``patchattn bench dit`` on the CPU with tiny shapes: every row written, the environment stamped, bad names
refused before any timing."""

import csv
import json

import pytest

pytest.importorskip("diffusers")

from patchattn.bench import dit


def test_bench_dit_writes_rows_and_environment(tmp_path):
    out = tmp_path / "dit.csv"
    assert dit.main(["--shapes", "tiny", "--methods", "dense", "--device", "cpu", "--dtype", "float32",
                     "--layers", "1", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["shape"], r["mode"], r["method"]) for r in rows] == [
        ("tiny-flux", "attention", "dense"), ("tiny-flux", "forward", "dense"),
        ("tiny-wan", "attention", "dense"), ("tiny-wan", "forward", "dense"),
        ("tiny-hunyuan", "attention", "dense"), ("tiny-hunyuan", "forward", "dense")]
    assert all(float(r["ms"]) > 0 and float(r["sdpa_ms"]) > 0 for r in rows)
    meta = json.loads((tmp_path / "dit.json").read_text())
    assert meta["command"].startswith("python -m patchattn.bench.dit") and "torch" in meta and "commit" in meta


def test_bench_dit_refuses_unknown_names():
    with pytest.raises(ValueError, match="Known methods"):
        dit.main(["--shapes", "tiny", "--methods", "no_such_method", "--device", "cpu"])
    with pytest.raises(SystemExit, match="unknown shapes"):
        dit.main(["--shapes", "flux-8k", "--methods", "dense", "--device", "cpu"])


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_mask_from_tiles_is_the_same_mask():
    """The Flex column of ``bench dit`` runs FlexAttention on the method's own tiles: whole, partial and empty tiles
    must give exactly the token mask (checked by running Flex against masked SDPA)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from patchattn.masks.tiles import tiles_from_token_mask

    torch.manual_seed(0)
    q_len, k_len, heads = 40, 56, 2
    mask = torch.rand(heads, q_len, k_len) < 0.3
    mask[:, :16, :16] = True  # a whole tile
    mask[:, 16:32, 32:48] = False  # an empty tile
    mask[:, torch.arange(q_len), torch.arange(q_len)] = True  # every row sees a key
    tiled = tiles_from_token_mask(mask, 16, 16)
    block_mask = dit.flex_mask_from_tiles(tiled, heads)
    q, k, v = torch.randn(1, heads, q_len, 8), torch.randn(1, heads, k_len, 8), torch.randn(1, heads, k_len, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[None])
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=block_mask), expected, atol=1e-5, rtol=1e-4)


def test_flex_mask_from_whole_tiles_only():
    """A layout with no partial tile (gna's aligned strides) leaves an empty tile pool: the Flex mask must not index
    it (Inductor failed to lower that on the H200)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from patchattn.masks.tiles import tiles_from_token_mask

    torch.manual_seed(0)
    mask = torch.zeros(1, 32, 48, dtype=torch.bool)
    mask[:, :16, :32] = True
    mask[:, 16:, 16:] = True
    tiled = tiles_from_token_mask(mask, 16, 16)
    assert tiled.tile_masks.shape[0] == 0
    block_mask = dit.flex_mask_from_tiles(tiled, 1)
    q, k, v = torch.randn(1, 1, 32, 8), torch.randn(1, 1, 48, 8), torch.randn(1, 1, 48, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[None])
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=block_mask), expected, atol=1e-5, rtol=1e-4)


def test_drift_mode_compares_with_dense(tmp_path):
    """Drift rows: dense against itself is exact (cosine 1, PSNR inf); a sparse method moves the output."""
    import csv

    out = tmp_path / "drift.csv"
    assert dit.main(["--shapes", "tiny-wan", "--modes", "drift", "--methods", "dense;gna", "--device", "cpu",
                     "--dtype", "float32", "--layers", "1", "--drift-steps", "2", "--csv", str(out)]) == 0
    rows = {(r["mode"], r["method"]): r for r in csv.DictReader(out.open())}
    assert set(rows) == {(m, n) for m in ("drift-output", "drift-2-steps") for n in ("dense", "gna")}
    assert float(rows["drift-output", "dense"]["psnr_db"]) == float("inf")
    assert abs(float(rows["drift-output", "dense"]["cosine"]) - 1.0) < 1e-12
    assert float(rows["drift-output", "gna"]["psnr_db"]) < 200
    assert "not quality" in rows["drift-2-steps", "gna"]["note"]


def test_attention_rows_count_the_tiles_read(tmp_path):
    """Each attention row of a tiled method carries its plan's listed and partial tiles: radial's block
    granularity keeps the listed tiles and drops the partial ones but the padded keys'."""
    import csv

    from patchattn.masks.radial import radial_plan

    out = tmp_path / "radial.csv"
    wan = '"dense_first_steps":0,"dense_band":0,"decay_factor":0.2,"first_frame_sink":true,"block":16'
    methods = f'radial@token:{{{wan}}};radial@block:{{{wan},"granularity":"block"}}'
    assert dit.main(["--shapes", "small-wan", "--modes", "attention", "--methods", methods, "--device", "cpu",
                     "--dtype", "float32", "--csv", str(out)]) == 0
    rows = {r["method"]: r for r in csv.DictReader(out.open())}
    for label, granularity in (("radial@token", "token"), ("radial@block", "block")):
        plan = radial_plan((5, 16, 16), block=16, dense_band=0, decay_factor=0.2, first_frame_sink=True,
                           granularity=granularity)
        assert (int(rows[label]["listed_tiles"]), int(rows[label]["partial_tiles"])) == \
            (plan.listed_tiles, plan.partial_tiles)
        assert float(rows[label]["density"]) == plan.density
    assert int(rows["radial@block"]["partial_tiles"]) == 0 < int(rows["radial@token"]["partial_tiles"])
    assert float(rows["radial@block"]["density"]) > float(rows["radial@token"]["density"])


def test_hunyuan_forward_goes_through_the_method():
    """The HunyuanVideo forward rows time the method: patched, every joint attention of the dual- and single-stream
    blocks runs it on the model's own layout (video grid first, text last; the text refiner stays dense), which
    moves the output, while ``dense`` patched gives the unpatched output."""
    import torch

    from patchattn.api import patched

    shape = dit.SHAPES["tiny-hunyuan"]
    model, inputs, note = dit.built_model(shape, 1, torch.device("cpu"), torch.float32)
    assert "1 double + 2 single blocks" in note

    def output():
        with torch.no_grad():
            return model(**inputs).sample

    reference = output()
    with patched(model, "dense"):
        torch.testing.assert_close(output(), reference, atol=1e-5, rtol=1e-4)
    with patched(model, "gna") as handle:
        got = output()
        states = [model.get_submodule(name).patchattn for name in handle.modules]
    assert sorted(handle.modules) == sorted(["transformer_blocks.0.attn", "single_transformer_blocks.0.attn",
                                             "single_transformer_blocks.1.attn"])
    for state in states:
        assert state.context.layout.grid == shape.grid
        assert state.context.layout.text_slices == ((shape.n_image, shape.tokens),)
        assert 0 < state.stats["density"] < 1
    assert (got - reference).abs().max() > 1e-4

    rows = dit.forward_rows(shape, [("gna", "gna", {})], 1, torch.device("cpu"), torch.float32)
    assert [(r["shape"], r["mode"], r["method"], r["tokens"]) for r in rows] == [
        ("tiny-hunyuan", "forward", "gna", shape.tokens)]
    assert rows[0]["ms"] > 0 and rows[0]["sdpa_ms"] > 0 and rows[0]["note"] == note
