"""CPU proxy of design note 60: what `paint`'s received patch scores cost, before and after the column-mean path.

**CPU, not the GPU figure.**  On a GPU the new path is a Triton kernel, which this script cannot time (the CPU runs
the torch path); the H100 re-run is ``python -m patchattn.bench.lvlm --csv bench/lvlm/h100.csv``.

    mkdir -p /tmp/before && git archive 453a08d | tar -x -C /tmp/before
    python3 bench/lvlm/paint_scores_cpu.py --before /tmp/before --csv bench/lvlm/paint_scores_cpu.csv

Each case runs in a fresh process, once with ``PYTHONPATH`` on the tree before note 60 (``--before``), once on the
tree this script sits in.  Cases:

- ``patch_scores``: one call of ``paint.patch_scores`` (received scores, ``chunk=256``) on random q/k at
  Qwen2.5-VL-7B's vision geometry (16 heads, head_dim 80) with N patches (4,096: a 1,024-token image; 16,384: the
  4,096-token image of ``bench/lvlm/h100.csv``), fp32 or bf16 inputs; median of 3 calls after a warm-up at N=4096,
  one call at 16,384; peak = the process's peak resident memory minus its resident memory before the first call.
- ``prefill_unpatched`` / ``prefill_paint``: one whole prefill (``logits_to_keep=1``, fp32) of a reduced Qwen2.5-VL
  (vision tower 8 layers, full attention in 4, the 7B's 16 heads x 80; language model 4 layers, hidden 896) on a
  64 x 64 patch image (4,096 patches, 1,024 image tokens); unpatched and paint alternate, 3 pairs after a warm-up,
  medians.  Attribution: paint's functions timed inside its prefills (wrapped in place): ``scores_s`` the vision
  capture's ``patch_scores`` (both captured layers), ``tokens_s`` the token choice (``current_tokens``, with
  ``build_tokens``), ``text_edit_s`` the language-side edit outside the dense attention (``shared_boosts``,
  ``last_row``, ``edited_last_row``); per prefill, medians.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[2]  # the tree this script belongs to
SCORE_CASES = [(4096, "float32"), (4096, "bfloat16"), (16384, "float32"), (16384, "bfloat16")]
FIELDS = ["tree", "case", "patches", "heads", "dtype", "seconds", "peak_mb", "scores_s", "tokens_s", "text_edit_s",
          "threads", "error"]
TEXT_EDIT = ("shared_boosts", "last_row", "edited_last_row")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def scores_case(patches: int, dtype: str) -> dict:
    from patchattn.methods import paint

    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 16, patches, 80, generator=gen).to(getattr(torch, dtype)) for _ in "qk")
    call = functools.partial(paint.patch_scores, q, k, None, scaling=80 ** -0.5, use_cls=False, chunk=256)
    before = _rss_bytes()
    with torch.no_grad():
        runs = []
        for _ in range(4 if patches <= 4096 else 1):
            start = time.perf_counter()
            call()
            runs.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    seconds = statistics.median(runs[1:]) if len(runs) > 1 else runs[0]
    return {"case": "patch_scores", "patches": patches, "heads": 16, "dtype": dtype, "seconds": round(seconds, 3),
            "peak_mb": round(max(0, peak) / 2**20)}


def _reduced_qwen25vl(side: int):
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    text = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 4, "num_attention_heads": 14,
            "num_key_value_heads": 2, "vocab_size": 152064, "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6}}
    vision = {"depth": 8, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 896,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
              "fullatt_block_indexes": [1, 3, 5, 7]}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                              vision_start_token_id=151652, vision_end_token_id=151653)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(100, 30000, (128,), generator=gen)
    ids = torch.cat([words[:32], torch.tensor([151652]), torch.full((side * side // 4,), 151655),
                     torch.tensor([151653]), words[32:]])[None]
    inputs = {"input_ids": ids, "mm_token_type_ids": (ids == 151655).long(),
              "pixel_values": torch.randn(side * side, 3 * 2 * 14 * 14, generator=gen),
              "image_grid_thw": torch.tensor([[1, side, side]])}
    return model, inputs


def _timed(module, names, totals):
    """Wrap ``module.<name>`` so its wall time adds up in ``totals[name]``."""
    for name in names:
        fn = getattr(module, name)

        def timed(*args, _fn=fn, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - start
        setattr(module, name, timed)


def prefill_cases(side: int = 64, pairs: int = 3) -> list[dict]:
    import patchattn
    from patchattn.methods import paint

    model, inputs = _reduced_qwen25vl(side)

    def prefill():
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)

    totals: dict = {}
    _timed(paint, ("patch_scores", "current_tokens", *TEXT_EDIT), totals)
    times = {"unpatched": [], "paint": []}
    parts = {"scores_s": [], "tokens_s": [], "text_edit_s": []}
    prefill()  # warm-up, unpatched
    for i in range(pairs + 1):
        for label in ("unpatched", "paint"):
            if label == "paint":
                patchattn.patch(model, "paint")
            totals.clear()
            start = time.perf_counter()
            prefill()
            seconds = time.perf_counter() - start
            if label == "paint":
                patchattn.unpatch(model)
            if i == 0:
                continue  # the paint warm-up
            times[label].append(seconds)
            if label == "paint":
                parts["scores_s"].append(totals.get("patch_scores", 0.0))
                parts["tokens_s"].append(totals.get("current_tokens", 0.0))
                parts["text_edit_s"].append(sum(totals.get(n, 0.0) for n in TEXT_EDIT))
    rows = []
    for label, runs in times.items():
        row = {"case": f"prefill_{label}", "patches": side * side, "heads": 16, "dtype": "float32",
               "seconds": round(statistics.median(runs), 3)}
        if label == "paint":
            row.update({name: round(statistics.median(values), 4) for name, values in parts.items()})
        rows.append(row)
    return rows


def _child(tree: Path, case: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    run = subprocess.run([sys.executable, __file__, "--one", case], capture_output=True, text=True, check=False,
                         env=env)
    if run.returncode != 0:
        return [{"case": case, "error": (run.stderr.strip().splitlines() or ["?"])[-1]}]
    return json.loads(run.stdout.splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="a copy of the tree before note 60 (git archive 453a08d)")
    p.add_argument("--csv", help="write the rows here (a .json beside it stamps the environment)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one case in this process
    args = p.parse_args(argv)
    if args.one:
        if args.one == "prefill":
            rows = prefill_cases()
        else:
            patches, dtype = args.one.split(",")
            rows = [scores_case(int(patches), dtype)]
        import patchattn

        for row in rows:
            row["threads"] = torch.get_num_threads()
        print(f"patchattn: {patchattn.__file__}", file=sys.stderr)
        print(json.dumps(rows))
        return
    trees = ([("before", Path(args.before))] if args.before else []) + [("after", HERE)]
    rows = []
    for case in [f"{n},{d}" for n, d in SCORE_CASES] + ["prefill"]:
        for label, tree in trees:
            for row in _child(tree, case):
                row["tree"] = label
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.csv:
        sys.path.insert(0, str(HERE))
        from patchattn.report import write_stamped_csv

        write_stamped_csv(args.csv, rows, FIELDS, "python3 bench/lvlm/paint_scores_cpu.py " + " ".join(argv or
                                                                                                     sys.argv[1:]))


if __name__ == "__main__":
    main()
