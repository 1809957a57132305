"""CPU count of what landmark's inference launches and loads at the bench's shape (design note 61): the per-rank
engine path makes ``1 + K`` engine calls per layer (``K``: the widest list), the fused kernel one launch; and the
retrieved-block work of the fused kernel, in (row, key block) pairs scored: with 64-row tiles every row of a query
block scores every block of its list, with 16-row tiles (which skip the list entries none of their rows retrieved)
the tile's rows score its rows' blocks; the rows themselves need ``top_k`` each (``row_blocks_retrieved``).

    python3 bench/linear/landmark_lists_cpu.py --csv bench/linear/landmark_lists_cpu.csv

Retrieval only (no attention is run): Llama-3-8B attention shape (32 q / 8 kv heads, head_dim 128, B=1), block 64,
top_k 5, local 1, random normal q/k/v in fp32 and the untrained landmark parameters (``u = 0``, ``o = log 64``), as
``bash bench/linear/reproduce.sh landmark`` (random inputs: a query block's rows retrieve mostly different blocks,
the widest case for the lists).  No timing: speed is measured on the GPU.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import types

import torch
import torch.nn.functional as F

from patchattn.kernels.blocksparse import blocks_from_mask
from patchattn.methods import landmark


def count(length: int, heads: int = 32, kv_heads: int = 8, dim: int = 128, block: int = 64, top_k: int = 5,
          seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, length, dim, generator=gen)
    k, v = (torch.randn(1, kv_heads, length, dim, generator=gen) for _ in range(2))
    config = landmark.LandmarkConfig(block_size=block, top_k=top_k, local_blocks=1)
    state = types.SimpleNamespace(config=config, landmark_query=torch.zeros(kv_heads, dim),
                                  landmark_offset=torch.full((kv_heads,), math.log(block)))
    n_q = math.ceil(length / block)
    with torch.no_grad():
        marks = landmark.landmark_keys(k, v, state.landmark_query, block)
        row_block = torch.arange(n_q).repeat_interleave(block)[:length]
        picks = landmark.retrieve_blocks(q, marks, state.landmark_offset, dim ** -0.5, None, top_k, block,
                                         row_block, 0, 1, landmark.RETRIEVAL_CHUNK_SCORES)
    _, counts = blocks_from_mask(picks.union, min(marks.shape[2], block * top_k))
    tile = 16  # blocks a 16-row tile loads: the distinct entries its rows picked
    entry = F.pad(picks.entry, (0, 0, 0, n_q * block - length), value=-1).view(1, heads, -1, tile * top_k)
    hits = torch.zeros(*entry.shape[:3], int(counts.max()) + 1, dtype=torch.bool)
    hits.scatter_(-1, torch.where(entry >= 0, entry, hits.shape[-1] - 1), True)
    per_tile = hits[..., :-1].sum(-1)
    return {"T": length, "widest_list_K": int(counts.max()), "engine_calls_per_rank_path": 1 + int(counts.max()),
            "fused_launches": 1, "mean_list": round(counts.float().mean().item(), 1),
            "row_blocks_64row": int(counts.sum()) * block, "row_blocks_16row": int(per_tile.sum()) * tile,
            "row_blocks_retrieved": int(picks.count.sum())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="4096,8192,16384,32768")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    rows = []
    for length in (int(t) for t in args.lengths.split(",")):
        rows.append(count(length))
        print(rows[-1], flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
