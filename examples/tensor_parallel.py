"""A patched model under transformers' own tensor parallelism: each rank holds 1/N of every layer's heads.

    torchrun --nproc_per_node 2 examples/tensor_parallel.py [model folder or hub id] [method]

transformers shards q/k/v by columns and o_proj by rows (``DistributedConfig(tp_size=N)``; ``tp_plan="auto"`` is the
older spelling) on GPUs over NCCL, or on CPUs over gloo.  ``patchattn.patch`` after loading cuts every per-head
setting (retrieval heads, head lists, gains, MoA rules) to the rank's heads, so the logits equal the one-process
patched model's.  Without a model argument a tiny random Llama is written to a temporary folder (runs on a laptop).
"""

import os
import sys
import tempfile

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.distributed import DistributedConfig

import patchattn

world = int(os.environ.get("WORLD_SIZE", "1"))
name = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] != "tiny" else None
method = sys.argv[2] if len(sys.argv) > 2 else "headscale"
overrides = {"gains": {0: [2.0] + [1.0] * 3}} if method == "headscale" else {}

if name is None:  # a tiny random Llama (4 query heads, 2 KV heads), the same on every rank: same seed, own folder
    name = os.path.join(tempfile.mkdtemp(), "tiny")
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(name)

# from_pretrained starts the process group (gloo on CPU, NCCL on GPU) and shards the projections.
model = AutoModelForCausalLM.from_pretrained(name, distributed_config=DistributedConfig(tp_size=world),
                                             dtype=torch.float32).eval()
patchattn.patch(model, method, **overrides)
shard = model.model.layers[0].self_attn.patchattn.context.shard  # which heads this rank holds
ids = torch.arange(3, 35)[None].to(model.device)
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
if shard is None:
    heads = "all heads (one process)"
else:
    last = shard.head_offset + shard.local_heads - 1
    heads = f"rank {shard.rank}/{shard.world_size}: query heads {shard.head_offset}..{last}"
print(f"{heads}; generated {out[0, ids.shape[1]:].tolist()}")
if dist.is_initialized():
    dist.destroy_process_group()
