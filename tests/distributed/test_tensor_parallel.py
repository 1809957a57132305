"""Patched models under transformers' own tensor parallelism, 2 CPU processes over gloo.

The test saves a tiny Llama (GQA: 4 query heads, 2 KV heads; and MHA: 4 and 4), then ``torchrun`` runs this file
as a worker on 2 ranks: each rank loads the model with ``DistributedConfig(tp_size=2)`` (q/k/v column-sharded,
o_proj row-sharded: 2 query heads per rank) and the same model in one piece, patches both with each method and
compares the logits of a prefill and 3 decode steps.  The per-head settings (retrieval heads, head lists, gains,
MoA rules, MoH routing) differ between the two ranks' heads, so a rank reading another rank's settings, or all
heads' settings for its own heads, cannot pass; each case is also checked to change the logits (versus dense).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3  # decode steps after the prefill
TOL = 1e-4


def write_artifacts(folder: Path, layers: int, heads: int) -> dict[str, str]:
    """Per-head artifacts, different on the two ranks' heads: retrieval scores, a MoA plan."""
    assert (layers, heads) == (2, 4)
    # Top half: layer 0's first two heads, layer 1's last two (per KV-head pair: layer 0's first, layer 1's last).
    scores = [[9.0, 8.0, 1.0, 0.0], [2.0, 0.0, 7.0, 3.0]]
    rules = [[[2.0 + 4 * head, 0.05 * (head % 3)] for head in range(heads)] for _ in range(layers)]
    common = {"model": "tiny", "num_layers": layers, "num_heads": heads, "meta": {}}
    paths = {}
    for name, payload in (("scores", {"scores": scores}), ("rules", {"rules": rules})):
        path = folder / f"{name}.json"
        path.write_text(json.dumps({**common, **payload}))
        paths[name] = str(path)
    return paths


def cases(artifacts: dict[str, str]) -> dict[str, tuple[str, dict]]:
    """name -> (method, overrides).  Windows and blocks are small so a 96-token prompt is sparse."""
    return {
        "dense": ("dense", {}),
        "streaming": ("streaming", {"window": 24, "sink_tokens": 4, "block_size": 16}),
        "blocktopk": ("blocktopk", {"block_size": 16, "top_k": 1, "sink_blocks": 0, "local_blocks": 1}),
        "hip": ("hip", {"block_size": 16, "top_k": 1, "dense_layers": []}),
        "power": ("power", {"block_size": 16, "local_blocks": 2}),
        "softplus": ("softplus", {}),
        "duo": ("duo", {"scores": artifacts["scores"], "retrieval_fraction": 0.5, "window": 16, "sink_tokens": 4,
                        "block_size": 16, "kv_heads_together": False}),
        "duo_kv": ("duo", {"scores": artifacts["scores"], "retrieval_fraction": 0.5, "window": 16, "sink_tokens": 4,
                           "block_size": 16}),
        "moa": ("moa", {"plan": artifacts["rules"], "block_size": 16}),
        "act": ("act", {"heads": {0: [1, 2], 1: [3]}, "threshold": 0.02, "beta": 0.2}),
        "headscale": ("headscale", {"gains": {0: [0.5, 1.5, 2.0, 0.25], 1: {3: 3.0}}, "modes": {1: {0: "uniform"}}}),
        "moh": ("moh", {"top_k": 1}),
        "moh_learned": ("moh", {"router": "learned", "init_std": 0.5, "top_k": 1}),
    }


# ---- the worker (run by torchrun) ---------------------------------------------------------------------------------
def run_steps(model, ids):
    """Logits of a prefill and ``STEPS`` greedy decode steps, concatenated along the sequence.  The second row is
    left-padded by 8 tokens (the mask's path: padding starts, decode steps read each row's real keys)."""
    import torch

    mask = torch.ones_like(ids)
    mask[1, :8] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        logits, cache = [out.logits], out.past_key_values
        for _ in range(STEPS):
            nxt = logits[-1][:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.past_key_values
    logits = torch.cat(logits, dim=1)
    logits[1, :8] = 0  # padding rows' logits are not defined by any method
    return logits


def worker(folder: str, result: str) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import patchattn

    tp_model = AutoModelForCausalLM.from_pretrained(folder, distributed_config=DistributedConfig(tp_size=2),
                                                    dtype=torch.float32)
    one_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tp_model.eval(), one_model.eval()
    rank = dist.get_rank()
    config = tp_model.config
    report = {"local_q_rows": tuple(tp_model.model.layers[0].self_attn.q_proj.weight.to_local().shape)}
    ids = torch.randint(3, config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(0))
    dense = run_steps(one_model, ids)
    artifacts = write_artifacts(Path(folder), config.num_hidden_layers, config.num_attention_heads)
    for name, (method, overrides) in cases(artifacts).items():
        with patchattn.patched(one_model, method, **overrides):
            want = run_steps(one_model, ids)
        with patchattn.patched(tp_model, method, **overrides) as handle:
            shard = tp_model.model.layers[0].self_attn.patchattn.context.shard
            got = run_steps(tp_model, ids)
        del handle
        report[name] = {"diff": (got - want).abs().max().item(), "vs_dense": (want - dense).abs().max().item(),
                        "shard": [shard.rank, shard.world_size, shard.head_offset, shard.local_heads,
                                  shard.kv_head_offset, shard.local_kv_heads]}
    try:
        patchattn.patch(tp_model, "dma")
        report["refused"] = ""
    except ValueError as err:
        report["refused"] = str(err)
    report["unpatched"] = (run_steps(tp_model, ids) - dense).abs().max().item()
    report["loaded_patched"] = loaded_patched(one_model, folder, ids, rank)
    report["wrong_split"] = wrong_split(tp_model)
    report["gathered"] = shard.gather(torch.arange(2.0)[None] + 2 * rank, 1).tolist()
    Path(f"{result}.{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def wrong_split(tp_model) -> str:
    """The error for projections split other than by heads (q_proj row-split here, as no default plan does)."""
    from torch import nn
    from torch.distributed.tensor import Shard, distribute_tensor

    from patchattn.sharding import module_shard

    mesh = tp_model.model.layers[0].self_attn.q_proj.weight.device_mesh
    module = nn.Module()
    module.config = tp_model.config
    for name, dim in (("q_proj", 1), ("k_proj", 0), ("v_proj", 0), ("o_proj", 1)):
        layer = nn.Linear(64, 64, bias=False)
        layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(dim)]))
        setattr(module, name, layer)
    try:
        module_shard(module)
    except ValueError as err:
        return str(err)
    return ""


def loaded_patched(one_model, folder: str, ids, rank: int) -> float:
    """A folder saved while patched, loaded tensor-parallel: the lazily made states are cut to the rank's heads."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    import patchattn

    saved = f"{folder}-patched"
    with patchattn.patched(one_model, "headscale", gains={0: [0.5, 1.5, 2.0, 0.25]}):
        want = run_steps(one_model, ids)
        if rank == 0:
            one_model.save_pretrained(saved)
    dist.barrier()
    model = AutoModelForCausalLM.from_pretrained(saved, distributed_config=DistributedConfig(tp_size=2),
                                                 dtype=torch.float32).eval()
    return (run_steps(model, ids) - want).abs().max().item()


# ---- the tests ----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_tp(tmp_path: Path, kv_heads: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256)
    torch.manual_seed(0)
    folder = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, str(folder), str(tmp_path / "result")]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((tmp_path / f"result.{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_each_rank_runs_its_heads_and_matches_the_single_process_patched_model(tmp_path, kv_heads):
    reports = run_tp(tmp_path, kv_heads)
    names = list(cases({"scores": "", "rules": ""}))
    for rank, report in enumerate(reports):
        assert report["local_q_rows"] == [2 * 16, 64]  # 2 of 4 heads x head_dim 16: transformers really split them
        for name in names:
            case = report[name]
            assert case["shard"] == [rank, 2, 2 * rank, 2, rank * kv_heads // 2, kv_heads // 2], name
            assert case["diff"] < TOL, f"rank {rank} {name}: max |TP - single process| = {case['diff']}"
            if name != "dense":  # the case exercises the method: a rank running the wrong heads would differ
                assert case["vs_dense"] > 1e-3, f"{name} changes nothing on this input"
        assert "'dma'" in report["refused"] and "moh" in report["refused"], report["refused"]
        assert report["unpatched"] < TOL
        assert report["loaded_patched"] < TOL
        assert "q_proj: sharded on weight dim 1" in report["wrong_split"], report["wrong_split"]
        assert report["gathered"] == [[0.0, 1.0, 2.0, 3.0]]  # the heads of both ranks, in global order


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
