"""Ring attention for the ``dense`` method: keys and values travel round the ring and are dropped after use.

Each step a rank attends its query chunks to the shard it holds (another rank's chunks, or its own), keeping per
query row the partial output and its log-sum-exp, and forwards the shard; partial results merge exactly
(``merge``).  A rank holds at most two shards at once (the one it reads and the one arriving), against the whole
prompt's K/V with ``allgather``/``ring``.  Chunks are whole blocks and disjoint, so a shard's chunk lies wholly
before a query chunk (every key visible), is the query chunk itself (causal square), or lies after it (skipped).
Partial attention runs on the block-sparse engine (``return_lse``), which also takes soft-capping.

Only for ``dense``: a content-based selection (``hip``, ``blocktopk``) reads every key block's summary before it
chooses, which a shard at a time does not give (see docs/distributed.md).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..kernels.blocksparse import block_sparse_attention, blocks_from_mask
from ..masks import BlockGeometry, causal_allowed


def merge(acc: tuple | None, part: tuple) -> tuple:
    """Two partial softmax attentions over disjoint key sets -> the attention over their union.

    ``(out [B, H, Tq, D] fp32, lse [B, H, Tq] fp32)`` each; rows that see no key in a part have ``lse = -inf``."""
    if acc is None:
        return part
    (o1, l1), (o2, l2) = acc, part
    top = torch.maximum(l1, l2)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # both -inf: weights 0, not NaN
    w1, w2 = torch.exp(l1 - top), torch.exp(l2 - top)
    total = w1 + w2
    out = (o1 * w1[..., None] + o2 * w2[..., None]) / total.clamp(min=torch.finfo(total.dtype).tiny)[..., None]
    return out, top + torch.log(total)


def partial_attention(q, k, v, *, causal: bool, scaling, softcap, backend: str, block: int) -> tuple:
    """Attention of ``q`` to all of ``k`` (``causal``: square, query i sees keys <= i), with its log-sum-exp."""
    geometry = BlockGeometry(q.shape[2], k.shape[2], block, block)
    if causal:
        mask = causal_allowed(geometry, q.device)
    else:
        mask = torch.ones(geometry.n_q, geometry.n_k, dtype=torch.bool, device=q.device)
    kv_indices, kv_counts = blocks_from_mask(mask[None, None])
    out, lse = block_sparse_attention(q, k, v, kv_indices, kv_counts, block_q=block, block_k=block, causal=causal,
                                      scale=scaling, softcap=softcap, return_lse=True, backend=backend)
    return out.float(), lse.float()


def ring_attention(run, query, key, value, *, scaling=None, softcap=None, backend: str = "auto",
                   block: int = 128) -> torch.Tensor:
    """This rank's queries ``[B, Hq, T_local, D]`` against every rank's keys, passed round the ring:
    ``[B, T_local, Hq, Dv]``.  ``run``: the prefill in progress (``context_parallel._Prefill``)."""
    plan, rank, group = run.plan, run.rank, run.group
    world = plan.world
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    dk = key.shape[-1]
    held = torch.cat([key, value], dim=-1)
    pad = plan.max_local_length - held.shape[2]
    held = torch.nn.functional.pad(held, (0, 0, 0, pad)) if pad else held.contiguous()
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    acc: dict[int, tuple] = {}
    for step in range(world):
        requests, arriving = [], None
        if step < world - 1:
            arriving = torch.empty_like(held)
            requests = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, held, ranks[(rank + 1) % world], group=group),
                dist.P2POp(dist.irecv, arriving, ranks[(rank - 1) % world], group=group)])
        source = (rank - step) % world
        offset = 0
        for start, stop in plan.chunks[source]:  # the shard's chunks, at their places in its local tokens
            k = held[:, :, offset:offset + stop - start, :dk]
            v = held[:, :, offset:offset + stop - start, dk:]
            offset += stop - start
            for i, c in enumerate(run.chunks):
                if start >= c.stop:
                    continue  # after the query chunk: nothing visible
                q = query[:, :, c.local_start:c.local_stop]
                part = partial_attention(q, k.contiguous(), v.contiguous(), causal=start == c.start,
                                         scaling=scaling, softcap=softcap, backend=backend, block=block)
                acc[i] = merge(acc.get(i), part)
        for request in requests:
            request.wait()
        if arriving is not None:
            held = arriving
    outs = [acc[i][0].to(query.dtype).transpose(1, 2) for i in range(len(run.chunks))]
    return torch.cat(outs, dim=1)
