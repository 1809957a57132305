"""Context-parallel prefill of a long prompt over the processes of a torchrun job, then decoding on one.

    torchrun --nproc_per_node 2 examples/context_parallel.py [method] [tokens] [model]  # GPUs (NCCL) or CPU (gloo)

Each process prefills its share of the prompt's query blocks (zig-zag: equal causal work) and reads the other
processes' keys and values layer by layer; the logits it gets are the one-process prefill's for its tokens.  The
gathered KV cache then lets rank 0 decode alone.  Default: ``hip`` on 4,096 tokens of the embedded SmolLM2
(CPython's pydoc text), checked against a one-process prefill; ``model`` is ``smollm2`` or a local model folder
with its tokenizer (sliding-window layers, as Gemma 3's, run their window per chunk).
"""

import os
import sys

import torch
import torch.distributed as dist

import patchattn
from patchattn.data import text_token_ids
from patchattn.distributed import context_parallel

method = sys.argv[1] if len(sys.argv) > 1 else "hip"
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
model_name = sys.argv[3] if len(sys.argv) > 3 else "smollm2"

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank = dist.get_rank()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if cuda else torch.device("cpu")

model, tokenizer = patchattn.load(model_name)
model.to(device)
patchattn.patch(model, method)
ids = text_token_ids(tokenizer, tokens).to(device)  # [1, tokens], the same on every rank

cp = context_parallel(model, balance="zigzag", exchange="allgather")
with torch.no_grad():
    out = cp(ids, use_cache=True)                  # this rank's tokens only: out.logits [1, T_local, V]
    logits = cp.gather(out.logits)                 # [1, T, V] in prompt order, on every rank
    cache = cp.gather_cache(out.cache)             # the whole KV cache, on every rank ("past_key_values" before
                                                   # transformers renamed it)
print(f"rank {rank}: prefilled {out.logits.shape[1]} of {tokens} tokens in chunks {cp.plan.chunks[rank]}")

if rank == 0:
    with torch.no_grad():
        alone = model(ids).logits                  # the one-process prefill, for comparison
        print(f"max |context-parallel - one process| logits: {(logits - alone).abs().max().item():.2e}")
        first = logits[:, -1:].argmax(-1)
        generated = model.generate(torch.cat([ids, first], dim=1), cache=cache, max_new_tokens=16,
                                   do_sample=False)
    print("continuation:", tokenizer.decode(generated[0, tokens:], skip_special_tokens=True))
dist.barrier()
dist.destroy_process_group()
