"""Head sharding without processes: ``HeadShard``'s cuts, a simulated rank (each rank's state cut by
``shard_state`` runs its heads alone; the ranks' outputs put side by side equal the whole layer's), the methods
refused under tensor parallelism, and patch state placed on its layer's device (``device_map``)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import patchattn
from patchattn.sharding import (
    TENSOR_PARALLEL_METHODS,
    HeadShard,
    check_supported,
    model_shard,
    module_shard,
    shard_state,
)
from patchattn.state import STATE_ATTR, get_state


def tiny_llama(kv_heads: int = 2, layers: int = 2):
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


# ---- HeadShard ------------------------------------------------------------------------------------------------------
def test_a_shard_cuts_query_and_kv_head_tensors_by_their_size():
    shard = HeadShard(rank=1, world_size=2, heads=8, kv_heads=4)
    assert (shard.local_heads, shard.head_offset, shard.local_kv_heads, shard.kv_head_offset) == (4, 4, 2, 2)
    assert shard.local(torch.arange(8)).tolist() == [4, 5, 6, 7]
    assert shard.local(torch.arange(4)).tolist() == [2, 3]
    assert shard.local(torch.arange(16).view(2, 8), dim=1).tolist() == [[4, 5, 6, 7], [12, 13, 14, 15]]
    assert shard.local_indices(torch.tensor([1, 4, 6, 7])).tolist() == [0, 2, 3]
    assert shard.local_keys({0: "zero", 5: "uniform"}) == {1: "uniform"}
    with pytest.raises(ValueError, match="3 entries along dim 0; the model has 8 query heads and 4 KV heads"):
        shard.local(torch.arange(3))


def test_a_shard_refuses_heads_that_do_not_split_evenly():
    with pytest.raises(ValueError, match="kv_heads divisible by 4; the model has 2"):
        HeadShard(rank=0, world_size=4, heads=8, kv_heads=2)
    with pytest.raises(RuntimeError, match="process group"):
        HeadShard(rank=0, world_size=2, heads=4, kv_heads=2).gather(torch.zeros(1, 2), 1)


def test_plain_weights_mean_no_shard():
    model = tiny_llama()
    attention = model.model.layers[0].self_attn
    assert module_shard(attention) is None and model_shard([attention]) is None
    with patchattn.patched(model, "duo", retrieval_fraction=1.0):
        assert get_state(attention).context.shard is None


def test_unsupported_methods_and_model_kinds_say_what_is_supported():
    with pytest.raises(ValueError, match=r"'dma' has not been made tensor-parallel.*supported under tensor "
                                         r"parallelism: act, blocktopk, dense, duo"):
        check_supported("dma", "llm")
    with pytest.raises(ValueError, match="decoder-only LLMs; this is a 'lvlm' model"):
        check_supported("dense", "lvlm")
    check_supported("moh", "llm")


# ---- a simulated rank -----------------------------------------------------------------------------------------------
SIMULATED = {
    "duo": {"scores": None, "retrieval_fraction": 0.5, "window": 16, "sink_tokens": 4, "block_size": 16,
            "kv_heads_together": False},
    "headscale": {"gains": {0: [0.5, 1.5, 2.0, 0.25]}, "modes": {0: {3: "uniform", 0: "zero"}}},
    "act": {"heads": {0: [1, 2]}, "threshold": 0.02, "beta": 0.2},
    "moa": {"plan": None, "block_size": 16},
    "blocktopk": {"block_size": 16, "top_k": 1, "sink_blocks": 0, "local_blocks": 1},
}


def artifact(tmp_path, payload: str, rows) -> str:
    import json

    path = tmp_path / f"{payload}.json"
    path.write_text(json.dumps({"model": "tiny", "num_layers": 2, "num_heads": 4, payload: rows, "meta": {}}))
    return str(path)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("method", sorted(SIMULATED))
def test_each_simulated_rank_runs_its_heads_and_together_they_are_the_whole_layer(tmp_path, method, kv_heads):
    """Rank r gets query heads [2r, 2r+2) and its KV heads, its state cut by ``shard_state``; the outputs of the two
    ranks side by side equal the unsharded layer's (what o_proj's row split then sums)."""
    overrides = dict(SIMULATED[method])
    if method == "duo":
        overrides["scores"] = artifact(tmp_path, "scores", [[9.0, 8.0, 1.0, 0.0], [2.0, 0.0, 7.0, 3.0]])
    if method == "moa":
        overrides["plan"] = artifact(tmp_path, "rules", [[[2.0 + 4 * h, 0.05 * (h % 3)] for h in range(4)]] * 2)
    model = tiny_llama(kv_heads)
    module = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 64, 16, generator=gen)
    k, v = torch.randn(2, kv_heads, 64, 16, generator=gen), torch.randn(2, kv_heads, 64, 16, generator=gen)
    attention = ALL_ATTENTION_FUNCTIONS[f"patchattn_{method}"]
    with patchattn.patched(model, method, **overrides):
        full_state, locals_ = get_state(module), []
        for rank in range(2):  # cut when patching, before any call fills a cache
            shard = HeadShard(rank=rank, world_size=2, heads=4, kv_heads=kv_heads)
            local = copy.deepcopy(full_state)
            local.context.shard = shard
            shard_state(local, shard)
            locals_.append(local)
        whole = attention(module, q, k, v, None, scaling=0.25)[0]
        dense = ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, v, None, scaling=0.25, is_causal=True)[0]
        assert (whole - dense).abs().max() > 1e-3  # the per-head plan changes this layer
        parts = []
        for rank, local in enumerate(locals_):
            module._modules[STATE_ATTR] = local
            heads, kv = slice(2 * rank, 2 * rank + 2), slice(rank * kv_heads // 2, (rank + 1) * kv_heads // 2)
            parts.append(attention(module, q[:, heads], k[:, kv], v[:, kv], None, scaling=0.25)[0])
        module._modules[STATE_ATTR] = full_state
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=1e-5, atol=1e-5)


def test_the_simulated_rank_fails_when_a_rank_reads_the_other_ranks_plan():
    """The check above can fail: rank 1 running rank 0's gains differs from the whole layer."""
    model = tiny_llama()
    module = model.model.layers[0].self_attn
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    attention = ALL_ATTENTION_FUNCTIONS["patchattn_headscale"]
    with patchattn.patched(model, "headscale", gains={0: [0.5, 1.5, 2.0, 0.25]}):
        whole = attention(module, q, k, v, None, scaling=0.25)[0]
        local = copy.deepcopy(get_state(module))
        shard_state(local, HeadShard(rank=0, world_size=2, heads=4, kv_heads=2))  # rank 0's cut, run as rank 1
        full_state, module._modules[STATE_ATTR] = get_state(module), local
        wrong = attention(module, q[:, 2:], k[:, 1:], v[:, 1:], None, scaling=0.25)[0]
        module._modules[STATE_ATTR] = full_state
    assert (wrong - whole[:, :, 2:]).abs().max() > 1e-2


# ---- device maps ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "overrides"), [("act", {"heads": {0: [1], 1: [2]}}),
                                                    ("headscale", {"gains": {1: {0: 2.0}}}),
                                                    ("moh", {"router": "learned"})])
def test_each_layers_state_is_made_on_that_layers_device(method, overrides):
    """With layers on different devices (device_map), a layer's patch state lives where its weights do.  Only the
    CPU exists here: the second layer sits on the 'meta' device, which no state would reach by accident."""
    model = tiny_llama()
    model.model.layers[1].to("meta")
    patchattn.patch(model, method, **overrides)
    for index, device in ((0, "cpu"), (1, "meta")):
        state = get_state(model.model.layers[index].self_attn)
        tensors = [getattr(state.method_state, f) for f in state.method_state.DEVICE_FIELDS]
        tensors += list(state.parameters())
        assert tensors and all(t.device.type == device for t in tensors if torch.is_tensor(t)), (index, method)
    patchattn.unpatch(model)
    assert get_state(model.model.layers[1].self_attn) is None


def test_every_method_claimed_tensor_parallel_is_run_by_the_two_rank_test():
    from distributed.test_tensor_parallel import cases

    assert {method for method, _ in cases({"scores": "", "rules": ""}).values()} == TENSOR_PARALLEL_METHODS


LINE = r"(rank \d/2: query heads \d\.\.\d|all heads \(one process\)); generated (\[[^\]]*\])"


def test_the_torchrun_example_generates_on_each_rank_what_one_process_generates():
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from distributed.test_tensor_parallel import ROOT, free_port

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    example = str(Path(ROOT) / "examples" / "tensor_parallel.py")
    runs = {}
    for label, launcher in (("one", []), ("tp", ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                                                   "--master_addr", "127.0.0.1", "--master_port", str(free_port())])):
        proc = subprocess.run([sys.executable, *launcher, example, "tiny", "moh"], check=False, env=env,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[label] = sorted(re.findall(LINE, proc.stdout))  # the ranks' lines may interleave
    assert [heads for heads, _ in runs["tp"]] == ["rank 0/2: query heads 0..1", "rank 1/2: query heads 2..3"]
    assert {tokens for _, tokens in runs["tp"]} == {runs["one"][0][1]}
