"""Fixed cases for the behaviour pins (``tests/data/make_pins.py`` writes them, ``test_pinned_outputs`` checks)."""

from __future__ import annotations

import torch

import patchattn
from patchattn.testing import tiny_model

SMALL_BLOCKS = {"block_size": 16, "backend": "torch"}
# Settings at which each method is really sparse (or really changes the output) on 256 tokens of the tiny model.
PIN_CASES: dict[str, dict] = {
    "streaming": {**SMALL_BLOCKS, "window": 32},
    "power": {**SMALL_BLOCKS},
    "s2": {**SMALL_BLOCKS, "local_blocks": 2},
    "blocktopk": {**SMALL_BLOCKS, "top_k": 2},
    "blocktopk_fixed": {**SMALL_BLOCKS, "top_k": 3, "mass": 1.0, "per_head": False, "score": "mean"},
    "hip": {**SMALL_BLOCKS, "top_k": 2, "dense_layers": []},
    "hyper": {**SMALL_BLOCKS, "min_seq_len": 0, "lsh_blocks": 2, "sample_size": 16},
    "moa": {**SMALL_BLOCKS},
    "duo": {**SMALL_BLOCKS, "window": 32},
    "headscale": {"backend": "torch"},
    "moh": {"backend": "torch"},
    "act": {"backend": "torch"},
    "sinklora": {"backend": "torch"},
    "sinklora_h2o": {"backend": "torch", "kv_budget": 96},
    "headscale_gain": {"backend": "torch", "gains": {"0": {"0": 0.5, "1": 1.5}}, "modes": {"1": {"0": "uniform"}}},
    "moh_block": {"backend": "torch", "route_block": 16},
    "longlora": {"backend": "torch"},
}
PROMPT_LEN = 240
NEW_TOKENS = 6


def method_of(case: str) -> str:
    return case.split("_")[0]


def run_case(case: str) -> dict[str, torch.Tensor]:
    """Prefill logits, per-layer densities (NaN where a layer reports none) and greedy tokens of one case."""
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, 100, (1, PROMPT_LEN), generator=gen)
    with torch.no_grad(), patchattn.patched(model, method_of(case), **PIN_CASES[case]):
        logits = model(input_ids=ids).logits[0, -16:]
        density = torch.tensor([float(layer.self_attn.patchattn.stats.get("density", float("nan")))
                                for layer in model.model.layers], dtype=torch.float64)
        tokens = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return {"logits": logits.float(), "density": density, "tokens": tokens[0, PROMPT_LEN:].long()}
