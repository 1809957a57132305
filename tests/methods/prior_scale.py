"""The retrieval of ``landmark`` and the key ranking / block lists of ``dma`` as they were before design note 58
(verbatim, renamed), kept as the oracles of the bit-identity tests: the new code must give exactly these outputs.
Inference only (the landmark copy leaves out the training branch, which note 58 did not change)."""

import math

import torch
import torch.nn.functional as F

from patchattn.kernels.blocksparse import block_sparse_attention, blocks_from_mask
from patchattn.methods.dma import selection_score
from patchattn.methods.landmark import landmark_keys, landmark_logits

KEY_CHUNK = 256


def landmark_before(state, query, key, value, scale: float, softcap: float | None,
                    top_k: int) -> torch.Tensor:
    """The grouped softmax over local tokens and the ``top_k`` best earlier blocks per query and head, on unpadded
    rows (queries: the last ``Tq`` of ``Tk`` positions): ``[B, Hq, Tq, D]``."""
    config = state.config
    block, local = config.block_size, config.local_blocks
    batch, heads, q_len, _ = query.shape
    kv_len = key.shape[2]
    offset = kv_len - q_len
    pad = offset % block  # query blocks aligned on key blocks
    rows = q_len + pad
    n_q, n_k, n_c = math.ceil(rows / block), math.ceil(kv_len / block), kv_len // block
    device = query.device
    padded_q = F.pad(query, (0, 0, pad, 0)) if pad else query
    current = (offset - pad) // block + torch.arange(n_q, device=device)  # [NQ] key block of each query block
    blocks = torch.arange(n_k, device=device)
    backend = config.backend
    last_candidate = (offset - pad) // block + n_q - 1 - local  # the last query block's newest earlier block
    assert not torch.is_grad_enabled(), "inference only"

    def attend(kv_indices, kv_counts, return_lse=False):
        return block_sparse_attention(padded_q, key, value, kv_indices, kv_counts, block_q=block, block_k=block,
                                      causal=True, scale=scale, softcap=softcap, return_lse=return_lse,
                                      backend=backend)

    local_mask = (blocks[None] <= current[:, None]) & (blocks[None] > current[:, None] - local)
    out_local, lse_local = attend(*blocks_from_mask(local_mask[None, None]), return_lse=True)
    reads_local = (current - (current - local + 1).clamp(min=0) + 1).float()
    if last_candidate < 0 or top_k == 0:
        state.record(density=(reads_local / (current + 1)).mean())
        return out_local[:, :, pad:]

    landmarks = landmark_keys(key, value, state.landmark_query, block)
    logits = landmark_logits(padded_q, landmarks, state.landmark_offset, scale, softcap)  # [B, Hq, rows, NC]
    row_block = current.repeat_interleave(block)[:rows]
    candidate = torch.arange(n_c, device=device)[None] <= (row_block - local)[:, None]  # [rows, NC]
    candidate[:pad] = False  # the alignment rows retrieve nothing
    if top_k >= n_c:
        chosen = candidate.expand(batch, heads, rows, n_c)
    else:
        best = logits.masked_fill(~candidate, float("-inf")).topk(top_k, dim=-1).indices
        chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, best, True) & candidate

    union = F.pad(chosen, (0, 0, 0, n_q * block - rows)).view(batch, heads, n_q, block, n_c).any(3)
    kv_indices, kv_counts = blocks_from_mask(union)  # [B, Hq, NQ, K]
    gates, outs = [lse_local], [out_local]
    for rank in range(kv_indices.shape[-1]):
        listed = kv_counts > rank
        # The block's mass enters through its landmark gate, not through its own log-sum-exp.
        out_r = attend(kv_indices[..., rank:rank + 1].contiguous(), listed.to(torch.int32))
        row_pick = kv_indices[..., rank].long().repeat_interleave(block, dim=-1)[..., :rows, None]
        row_listed = listed.repeat_interleave(block, dim=-1)[..., :rows, None]
        keep = chosen.gather(-1, row_pick) & row_listed
        gates.append(logits.gather(-1, row_pick).masked_fill(~keep, float("-inf")).squeeze(-1))
        outs.append(out_r)
    weights = torch.softmax(torch.stack(gates, dim=-1), dim=-1)  # [B, Hq, rows, 1 + K]
    out = sum(weights[..., i, None] * outs[i].float() for i in range(len(outs)))
    reads = chosen.sum(-1).float() + reads_local.repeat_interleave(block)[:rows]
    state.record(density=(reads[..., pad:] / (row_block[pad:] + 1)).mean())
    return out[:, :, pad:].to(query.dtype)


def kept_until_before(bias: torch.Tensor, window: int, recency: float = 0.0) -> torch.Tensor:
    """long ``[B, Hkv, Tk]``: key ``j`` is among the top-``window`` keys (by ``selection_score``, ties to the later
    key) of every query ``i`` with ``j <= i < until_j``; ``until_j`` is the position of the ``window``-th key that
    beats ``j`` (``Tk`` when fewer do).  Uses the detached bias."""
    length = bias.shape[-1]
    if window >= length:
        return torch.full_like(bias, length, dtype=torch.long)
    bias = selection_score(bias, window, recency)
    pos = torch.arange(length, device=bias.device)
    out = []
    for lo in range(0, length, KEY_CHUNK):
        own, own_pos = bias[..., lo:lo + KEY_CHUNK, None], pos[lo:lo + KEY_CHUNK, None]
        beats = (bias[..., None, :] > own) | ((bias[..., None, :] == own) & (pos > own_pos))  # [B, H, C, Tk]
        out.append((beats.cumsum(-1, dtype=torch.int32) < window).sum(-1))
    return torch.cat(out, dim=-1).long()


def dynamic_mask_lists_before(until: torch.Tensor, first_block: int, n_q: int, block: int, kv_len: int):
    """Block lists and partial tiles for query blocks aligned on key blocks (query block ``m`` holds the positions of
    key block ``first_block + m``): ``(kv_indices, kv_counts, tile_masks, tile_mask_ids)``, per KV head."""
    batch, heads, _ = until.shape
    n_k = math.ceil(kv_len / block)
    # Keys past the end never bound anything (the engine hides them): a large "until".
    padded = F.pad(until, (0, n_k * block - kv_len), value=1 << 40).view(batch, heads, n_k, block)
    current = first_block + torch.arange(n_q, device=until.device)  # [NQ] key block of each query block
    first_row = current * block
    reads = (torch.arange(n_k, device=until.device)[None] <= current[:, None]) \
        & (padded.amax(-1)[:, :, None, :] > first_row[None, None, :, None])  # [B, H, NQ, NK]
    kv_indices, kv_counts = blocks_from_mask(reads)
    rows = first_row[:, None] + torch.arange(block, device=until.device)  # [NQ, block]
    keys = padded.gather(2, kv_indices.long()[..., None].flatten(2, 3).expand(-1, -1, -1, block))
    keys = keys.view(batch, heads, n_q, -1, block)  # [B, H, NQ, K, block]: until of each listed key
    tiles = rows[None, None, :, None, :, None] < keys[..., None, :]  # [B, H, NQ, K, block_q, block_k]
    listed = torch.arange(kv_indices.shape[-1], device=until.device) < kv_counts[..., None]
    partial = listed & ~tiles.flatten(-2).all(-1)
    tile_ids = torch.where(partial, partial.flatten().cumsum(0).view(partial.shape) - 1, -1).to(torch.int32)
    return kv_indices, kv_counts, tiles[partial], tile_ids
