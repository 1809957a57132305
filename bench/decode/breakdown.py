"""Where a `blocktopk` decode step spends its time (CUDA-graph replays, one stage at a time).

Stages: the in-place update of the newest block's mean key, the fused selection (scores + top-k; also with
``top_k=0`` to separate the top-k loop from the scoring), the split-K kernel on the selected lists, and the whole
step; per-head lists (the default) and per-GQA-group lists.  Llama-3-8B attention shapes, 128k keys, bf16.

    PYTHONPATH=. python3 bench/decode/breakdown.py --csv bench/decode/breakdown.csv
"""
from __future__ import annotations

import argparse
import csv
import json

import torch

from patchattn.bench.kernel import graph_ms
from patchattn.bench.methods import _decode_steps, _select, _state
from patchattn.kernels.blocksparse import block_sparse_attention
from patchattn.kernels.blockselect import decode_block_topk
from patchattn.methods.blocktopk import key_block_means


def stages(batch: int, T: int, per_head: bool) -> list[dict]:
    q = torch.randn(batch, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, 8, T, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    state = _state("blocktopk", {"per_head": per_head})
    config, block = state.config, state.config.block_size
    _select("blocktopk", state, q[:, :, :1].expand(-1, -1, 2, -1), k)  # fills the key-mean cache
    means = state.method_state.key_means.means

    def update():
        state.method_state.key_means.length = T - 1
        return key_block_means(state, k, block, 1)

    def select(top_k):
        return lambda: decode_block_topk(q[:, :, 0], means, top_k=top_k, sink_blocks=config.sink_blocks,
                                         local_blocks=config.local_blocks, per_head=per_head)

    idx, cnt = select(config.top_k)()
    step = _decode_steps("blocktopk", state, q, k, v)["step"]
    timed = {
        "means_update": update,
        "select": select(config.top_k),
        "select_top0": select(0),
        "kernel": lambda: block_sparse_attention(q, k, v, idx, cnt, block_q=block, block_k=block, backend="triton"),
        "step": step,
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    }
    return [dict(B=batch, T=T, per_head=per_head, stage=name, graph_us=1000 * graph_ms(fn))
            for name, fn in timed.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=131072)
    parser.add_argument("--csv")
    args = parser.parse_args()
    rows = []
    with torch.no_grad():
        for batch in (1, 8):
            for per_head in (True, False):
                for row in stages(batch, args.T, per_head):
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            f.write(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
