"""``patchattn bench generate`` on CPU with a tiny Llama: the CSV it writes, its error rows, the plot, the step
profile. (The real runs need a GPU: bench/generate/reproduce.sh.)"""
import csv
import json
import os
import time

import pytest
import torch

from patchattn.bench import generate, generate_plot
from patchattn.bench.generate_profile import owner

TINY = ["--shape", "tiny", "--layers", "2", "--device", "cpu", "--dtype", "float32", "--repeats", "3"]


def _rows(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ")
    stamp = json.loads(lines[0][2:])
    return stamp, list(csv.DictReader(lines[1:]))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("generate")
    code = generate.main([*TINY, "--lengths", "256", "--batch", "1", "--new-tokens", "1,17",
                          "--methods", 'dense;streaming:{"window": 64}', "--caches", "dynamic,static",
                          "--csv", str(out / "g.csv"), "--plot", str(out / "g.png")])
    return code, out


def test_csv_has_every_configuration_with_positive_decode_times(tiny_run):
    code, out = tiny_run
    assert code == 0
    stamp, rows = _rows(out / "g.csv")
    assert {"commit", "torch", "transformers", "device", "command"} <= set(stamp)
    assert list(rows[0]) == generate.COLUMNS
    assert [(r["method"], r["cache"]) for r in rows] == [
        ("dense", "dynamic"), ("dense", "static"), ("streaming", "dynamic"), ("streaming", "static")]
    for row in rows:
        assert row["error"] == ""
        assert float(row["decode_ms_per_step"]) > 0 and float(row["ttft_s"]) > 0
        assert float(row["decode_tok_s"]) == pytest.approx(1000 / float(row["decode_ms_per_step"]))
        assert row["new_tokens"] == "1,17"
        # 2 layers x (keys + values) x 2 KV heads x 16 dims x 4 bytes, for at least prompt + 16 new positions
        assert int(row["kv_cache_bytes"]) >= 2 * 2 * 2 * 16 * 4 * (256 + 16)
    static = [r for r in rows if r["cache"] == "static"]
    assert all(r["tokens_equal_dynamic"] == "1/1" for r in static)  # fp32: the static cache's tokens are the same
    assert {r["tokens_hash"] for r in rows if r["method"] == "dense"} == {rows[0]["tokens_hash"]}
    assert float(rows[0]["ttft_vs_sdpa"]) == pytest.approx(1.0)
    assert (out / "g.png").stat().st_size > 0


def test_unknown_cache_kind_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.parse_args(["--caches", "dynamic,paged"])
    assert exit_info.value.code == 2
    assert "unknown cache kind 'paged'" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["9,1", "0,4", "1,2,3", "a,b"])
def test_new_token_counts_must_be_two_increasing_counts(text):
    with pytest.raises(Exception, match="N1,N2"):
        generate.new_token_counts(text)


def test_cache_kinds_can_be_limited_to_methods():
    kinds = generate.cache_kinds("static,dynamic,bounded=streaming+duo,bounded-static-compiled=duo")
    methods = [("dense", "dense", {}), ("streaming@w", "streaming", {"window": 64})]
    configs = [(label, kind) for label, _, _, kind, _, _ in generate.configurations(methods, kinds, [256], [1])]
    assert configs == [("dense", "dynamic"), ("dense", "static"),
                       ("streaming@w", "dynamic"), ("streaming@w", "static"), ("streaming@w", "bounded")]


def test_cache_bytes_count_each_storage_of_the_layers_once():
    from dataclasses import dataclass

    @dataclass
    class Group:
        keys: torch.Tensor
        values: torch.Tensor

    class Layer:
        def __init__(self):
            buffer = torch.zeros(2, 4, 8)
            self.keys, self.values = buffer[0], buffer[1]  # two views of one storage: 256 bytes
            self.groups = [Group(torch.zeros(3), torch.zeros(5))]  # 32 bytes
            self.module = torch.nn.Linear(64, 64)  # a bounded layer's module: not the cache's memory

    class Cache:
        layers = [Layer(), Layer()]

    assert generate.cache_nbytes(Cache()) == 2 * (256 + 32)
    assert generate.cache_nbytes(None) is None


def test_a_failing_configuration_becomes_an_error_row(tmp_path, monkeypatch):
    real = generate.timed_generate

    def failing(model, ids, kind, new_tokens, plan):
        if kind == "static":
            raise RuntimeError("CUDA out of memory. Tried to allocate 17.00 GiB\nmore details")
        return real(model, ids, kind, new_tokens, plan)

    monkeypatch.setattr(generate, "timed_generate", failing)
    assert generate.main([*TINY, "--lengths", "128", "--new-tokens", "1,3", "--repeats", "1", "--methods",
                          "dense,nosuch", "--caches", "dynamic,static", "--csv", str(tmp_path / "e.csv")]) == 0
    _, rows = _rows(tmp_path / "e.csv")
    errors = {(r["method"], r["cache"]): r["error"] for r in rows}
    assert errors[("dense", "dynamic")] == ""
    assert errors[("dense", "static")] == "RuntimeError: CUDA out of memory. Tried to allocate 17.00 GiB"
    assert errors[("nosuch", "dynamic")].startswith("patch failed: ValueError: unknown attention method 'nosuch'")
    assert rows[0]["decode_ms_per_step"] != "" and rows[1]["decode_ms_per_step"] == ""


def test_bounded_without_the_feature_is_an_error_row(tmp_path, monkeypatch):
    import patchattn

    monkeypatch.setattr(patchattn, "bounded_cache", None, raising=False)  # as a version without it
    assert generate.main([*TINY, "--lengths", "128", "--new-tokens", "1,3", "--repeats", "1", "--methods", "dense",
                          "--caches", "bounded", "--csv", str(tmp_path / "b.csv")]) == 0
    _, rows = _rows(tmp_path / "b.csv")
    assert rows[0]["error"].startswith("not available")


def test_full_caches_that_cannot_fit_are_skipped():
    from transformers import LlamaConfig

    config = LlamaConfig(**generate.SHAPES["llama3-8b"], num_hidden_layers=32)
    per_sequence = generate.full_kv_bytes(config, 1, 131072, torch.bfloat16)
    assert per_sequence == 2 * 32 * 8 * 128 * 2 * 131072  # 16 GiB: keys and values of 32 layers, 8 KV heads
    weights, h200 = 16 * 2**30, 141 * 10**9
    generate.check_fits(per_sequence, weights, h200)
    with pytest.raises(generate.NotRun, match="skipped: KV cache 128.0 GiB"):
        generate.check_fits(generate.full_kv_bytes(config, 8, 131072, torch.bfloat16), weights, h200)


def test_reference_csv_gives_token_equality(tmp_path):
    reference = tmp_path / "ref.csv"
    reference.write_text("# {}\nmethod,cache,batch,prompt,new_tokens,tokens_hash,error\n"
                         'hip,dynamic,2,4096,"1,25",aaa bbb,\nhip,static,2,4096,"1,25",aaa ccc,\n')
    hashes = generate.reference_hashes([str(reference)])
    assert hashes == {("hip", 2, 4096, "1,25"): "aaa bbb"}
    assert generate.equal_count("aaa ccc", hashes[("hip", 2, 4096, "1,25")]) == "1/2"


def test_sdpa_ratios_use_the_same_cache_kind_else_dynamic():
    rows = [{"method": "dense", "cache": "dynamic", "batch": 1, "prompt": 8, "ttft_s": 2.0, "decode_tok_s": 10.0},
            {"method": "dense", "cache": "static", "batch": 1, "prompt": 8, "ttft_s": 4.0, "decode_tok_s": 20.0},
            {"method": "hip", "cache": "static", "batch": 1, "prompt": 8, "ttft_s": 1.0, "decode_tok_s": 30.0},
            {"method": "hip", "cache": "bounded", "batch": 1, "prompt": 8, "ttft_s": 1.0, "decode_tok_s": 30.0},
            {"method": "hip", "cache": "dynamic", "batch": 1, "prompt": 8, "error": "OOM"}]
    generate.add_sdpa_ratios(rows)
    assert (rows[2]["ttft_vs_sdpa"], rows[2]["decode_vs_sdpa"]) == (4.0, 1.5)
    assert (rows[3]["ttft_vs_sdpa"], rows[3]["decode_vs_sdpa"]) == (2.0, 3.0)
    assert rows[4]["ttft_vs_sdpa"] is None


def test_plot_from_committed_style_csvs(tmp_path):
    header = ",".join(generate.COLUMNS)
    body = ["dense,dynamic,1,32768,1.4,95,3,10.5,,,26.6,100,,h,\"1,25\",3,20,",
            "hip,dynamic,1,32768,1.0,45,2,22.1,,,26.7,100,,h,\"1,25\",3,20,",
            "hip,static-compiled,1,32768,1.0,20,1,50,,,26.7,100,1/1,h,\"1,25\",3,90,",
            "dense,dynamic,1,131072,11.6,73,3,13.7,,,61.6,100,,h,\"1,25\",3,60,",
            "hip,dynamic,1,131072,4.5,73,3,13.7,,,61.7,100,,h,\"1,25\",3,40,",
            "hip,dynamic,8,131072,,,,,,,,,,,\"1,25\",3,0,skipped: KV cache 128.0 GiB"]
    (tmp_path / "a.csv").write_text("# {}\n" + header + "\n" + "\n".join(body[:3]) + "\n")
    (tmp_path / "b.csv").write_text("# {}\n" + header + "\n" + "\n".join(body[3:]) + "\n")
    out = tmp_path / "plot" / "generate.png"
    assert generate_plot.main([str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_step_writes_json_and_markdown(tmp_path):
    base = tmp_path / "profile"
    assert generate.main([*TINY, "--lengths", "192", "--methods", 'dense;streaming:{"window": 64}',
                          "--profile-step", str(base), "--profile-steps", "3"]) == 0
    report = json.loads(base.with_suffix(".json").read_text())
    dense, streaming = report["methods"]["dense"], report["methods"]["streaming"]
    assert dense["step_ms_median"] > 0 and dense["host_ops"]
    assert dense["ours_share"] == 0  # SDPA: no patchattn code runs in the step
    assert streaming["ours_share"] > 0
    assert sum(streaming["host_split_share"].values()) == pytest.approx(1.0)
    assert "## streaming" in base.with_suffix(".md").read_text()


def test_owner_of_profiled_code():
    assert owner("/x/site-packages/transformers/models/llama/modeling_llama.py") == "transformers"
    assert owner("/repo/patchattn/methods/_sparse.py") == "patchattn"
    assert owner("/repo/patchattn/bench/generate_profile.py") == "harness"
    assert owner("/x/site-packages/torch/nn/modules/linear.py") == "torch"
    assert owner("~") == "C"


@pytest.mark.skipif(not os.environ.get("PATCHATTN_SLOW"), reason="compiles the tiny model twice: about a minute "
                    "on CPU; set PATCHATTN_SLOW=1")
def test_compiled_kinds_record_their_graphs(tmp_path):
    """transformers' compiled static-cache step and torch.compile(model.forward) on CPU (about a minute)."""
    assert generate.main([*TINY, "--lengths", "128", "--new-tokens", "1,5", "--repeats", "1", "--methods", "dense",
                          "--caches", "dynamic,static-compiled,compiled", "--csv", str(tmp_path / "c.csv")]) == 0
    _, rows = _rows(tmp_path / "c.csv")
    by_cache = {r["cache"]: r for r in rows}
    assert by_cache["dynamic"]["graphs_warmup"] == ""  # eager: no compile counters
    for cache in ("static-compiled", "compiled"):
        row = by_cache[cache]
        assert row["error"] == "" and row["tokens_equal_dynamic"] == "1/1"
        assert int(row["graphs_warmup"]) > 0  # compiled during the warm-up ...
        assert int(row["graphs_timed"]) == 0  # ... and not again inside the timed calls (SDPA: static shapes)


def test_decode_step_is_timed_inside_each_call_not_across_calls(monkeypatch):
    """A prefill that varies between calls (here: every short call's prefill 0.3 s slower) makes the differential
    (t(N2) - t(N1)) / (N2 - N1) negative, as the 128k compiled runs saw; the in-call clock is unaffected."""
    model = generate.build_model(2, 300, shape="tiny", device="cpu", dtype=torch.float32)
    ids = torch.randint(3, 100, (1, 64), generator=torch.Generator().manual_seed(0))
    prefills = []

    def slow_short_prefills(_module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is not None and x.shape[1] > 1:
            prefills.append(x.shape[1])
            if len(prefills) % 2 == 0:  # the warm-up is prefill 1, then (short, long) pairs: 2, 3, 4, 5
                time.sleep(0.3)

    handle = model.model.register_forward_pre_hook(slow_short_prefills, with_kwargs=True)
    try:
        row, _ = generate.measure(model, ids, "dynamic", generate.Plan(1, 9, repeats=2))
    finally:
        handle.remove()
    assert len(prefills) == 5
    assert row["decode_ms_differential"] < 0 < row["decode_ms_per_step"] < 300 / 8
