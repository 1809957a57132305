"""kernels/landmark: the torch reference against a row-by-row float64 oracle of the grouped softmax, and the Triton
forward (interpreter on CPU) against the reference: fp32 / bf16 / fp16, odd lengths, queries starting mid-block,
GQA, decode rows, two local blocks, soft-cap, many picks per row (dense gates), sub-tiled query blocks, rows that
retrieve nothing.  Forward only."""

import math

import pytest
import torch
import torch.nn.functional as F

from patchattn.kernels import kernel_options
from patchattn.kernels.blocksparse import blocks_from_mask
from patchattn.kernels.landmark import (
    SPARSE_PICKS_MAX,
    landmark_block_attention,
    landmark_block_attention_torch,
)


def _picks(batch, heads, q_len, kv_len, block, local, picks, gen, skip_rows=0):
    """Random retrieval in the layout the method gives: each row picks ``picks`` of its candidate blocks (complete,
    before its local blocks), its query block's list is the union of its rows' picks, a pick's entry is the block's
    rank in that list.  Returns (kv_indices, kv_counts, entry, gate) with ``entry`` / ``gate`` on the unpadded rows
    (the first ``skip_rows`` rows pick nothing)."""
    pad = (kv_len - q_len) % block
    rows = q_len + pad
    n_q, n_c = math.ceil(rows / block), kv_len // block
    row_block = (kv_len - q_len - pad) // block + torch.arange(rows) // block
    candidate = torch.arange(n_c)[None] <= (row_block - local)[:, None]  # [rows, NC]
    candidate[:pad + skip_rows] = False
    noise = torch.rand(batch, heads, rows, n_c, generator=gen).masked_fill(~candidate, -1.0)
    k = min(picks, n_c)
    pick = noise.topk(k, dim=-1).indices if k else torch.zeros(batch, heads, rows, 0, dtype=torch.long)
    chosen = candidate.expand(batch, heads, rows, n_c).gather(-1, pick)
    picked = torch.zeros(batch, heads, rows, n_c, dtype=torch.bool).scatter_(-1, pick, chosen)
    union = F.pad(picked, (0, 0, 0, n_q * block - rows)).view(batch, heads, n_q, block, n_c).any(3)
    kv_indices, kv_counts = blocks_from_mask(union, max(1, n_c))
    ranks = union.cumsum(-1) - 1
    entry = ranks[:, :, torch.arange(rows) // block].gather(-1, pick).masked_fill(~chosen, -1)
    gate = torch.randn(batch, heads, rows, k, generator=gen) * 2 + 1
    return kv_indices, kv_counts, entry[:, :, pad:], gate[:, :, pad:]


def _case(batch=2, heads=4, kv_heads=2, q_len=75, kv_len=75, dim=16, block=16, local=1, picks=2, seed=0,
          skip_rows=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=gen).to(dtype)
    k, v = (torch.randn(batch, kv_heads, kv_len, dim, generator=gen).to(dtype) for _ in range(2))
    return (q, k, v, *_picks(batch, heads, q_len, kv_len, block, local, picks, gen, skip_rows))


def _row_oracle(q, k, v, kv_indices, kv_counts, entry, gate, block, local, scale, softcap=None):
    """Row by row in float64, from the definition: items = the row's local keys (score ``s_j``, value ``v_j``) and
    its picked blocks (log-weight: the gate; value: the block's own softmax of its keys' scores times values)."""
    batch, heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    pad = (kv_len - q_len) % block
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(batch, heads, q_len, dim, dtype=torch.float64)

    def scores(query, keys):
        s = keys @ query * scale
        return s if softcap is None else softcap * torch.tanh(s / softcap)

    for b in range(batch):
        for h in range(heads):
            kh = h // (heads // kv_heads)
            for i in range(q_len):
                pos = kv_len - q_len + i
                lo = max(0, (pos // block - local + 1) * block)
                logits = [scores(q[b, h, i], k[b, kh, lo:pos + 1])]
                values = [v[b, kh, lo:pos + 1]]
                m = (i + pad) // block
                for e, g in zip(entry[b, h, i].tolist(), gate[b, h, i].double().tolist()):
                    if e < 0:
                        continue
                    assert e < kv_counts[b, h, m]
                    n = int(kv_indices[b, h, m, e])
                    within = torch.softmax(scores(q[b, h, i], k[b, kh, n * block:(n + 1) * block]), 0)
                    logits.append(torch.tensor([g], dtype=torch.float64))
                    values.append((within @ v[b, kh, n * block:(n + 1) * block])[None])
                weights = torch.softmax(torch.cat(logits), 0)
                out[b, h, i] = weights @ torch.cat(values)
    return out


CASES = [  # (q_len, kv_len, block, local, picks, softcap)
    (75, 75, 16, 1, 2, None),   # odd length: the last key block incomplete
    (7, 83, 16, 1, 2, None),    # a chunk of queries starting mid-block (alignment rows)
    (1, 70, 32, 1, 3, None),    # one decode row
    (2, 90, 32, 1, 2, None),    # two decode rows, 24 alignment rows: the first 16-row tile is not launched
    (90, 90, 16, 2, 3, 4.0),    # two local blocks, soft-capped scores
    (64, 64, 16, 1, 9, None),   # picks > candidates for early rows
]


@pytest.mark.parametrize("q_len,kv_len,block,local,picks,softcap", CASES)
def test_reference_matches_the_row_by_row_oracle(q_len, kv_len, block, local, picks, softcap):
    args = _case(batch=1, q_len=q_len, kv_len=kv_len, block=block, local=local, picks=picks)
    want = _row_oracle(*args, block, local, 0.3, softcap)
    got = landmark_block_attention_torch(*args, block=block, local_blocks=local, scale=0.3, softcap=softcap,
                                         chunk_scores=4 * 75 * 11)  # several chunks of rows
    assert (got.double() - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("q_len,kv_len,block,local,picks,softcap", CASES)
def test_triton_matches_the_reference(triton_target, dtype, tol, q_len, kv_len, block, local, picks, softcap):
    args = _case(q_len=q_len, kv_len=kv_len, block=block, local=local, picks=picks, dtype=dtype)
    kwargs = {"block": block, "local_blocks": local, "scale": 0.3, "softcap": softcap}
    want = landmark_block_attention_torch(*args, **kwargs)
    got = landmark_block_attention(*(t.to(triton_target) for t in args), **kwargs, backend="triton")
    assert got.dtype == dtype and got.shape == args[0].shape
    assert (got.cpu().float() - want.float()).abs().max().item() <= tol * max(1.0, want.float().abs().max().item())


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (4, 1)])
def test_triton_gqa_head_mapping(triton_target, heads, kv_heads):
    args = _case(batch=1, heads=heads, kv_heads=kv_heads, q_len=50, kv_len=67, picks=2, seed=3)
    want = landmark_block_attention_torch(*args, block=16, local_blocks=1, scale=0.25)
    got = landmark_block_attention(*(t.to(triton_target) for t in args), block=16, local_blocks=1, scale=0.25,
                                   backend="triton")
    assert (got.cpu() - want).abs().max().item() <= 2e-6


def test_triton_row_subtiles_and_dense_gates(triton_target):
    """16-row tiles inside 32-row query blocks (each skips the list entries none of its rows retrieved), with every
    candidate picked (``top_k`` >= the blocks); more than ``SPARSE_PICKS_MAX`` picks per row go through the dense
    gate matrix, with and without sub-tiles."""
    every = _case(batch=1, q_len=150, kv_len=160, block=32, local=1, picks=1 << 10, seed=5)
    one = _case(batch=1, q_len=64, kv_len=64 + 20 * 32, block=32, local=1, picks=1, seed=8)  # sparse unions
    many = _case(batch=1, q_len=40, kv_len=40 + 25 * 16, block=16, local=1, picks=20, seed=6)
    assert every[5].shape[-1] == 5 and many[5].shape[-1] == 20 > SPARSE_PICKS_MAX
    for args, block, tiles in ((every, 32, (16, 32)), (one, 32, (16, 32)), (many, 16, None), (many, 16, (16, 16))):
        kwargs = {"block": block, "local_blocks": 1, "scale": 0.25}
        want = landmark_block_attention_torch(*args, **kwargs)
        with kernel_options(interpreter_tiles=tiles):
            got = landmark_block_attention(*(t.to(triton_target) for t in args), **kwargs, backend="triton")
        assert (got.cpu() - want).abs().max().item() <= 2e-6


def test_rows_without_picks_are_their_local_softmax(triton_target):
    """Rows that retrieve nothing (and a call with no lists at all) give the plain causal softmax over their local
    keys."""
    q, k, v, lists, counts, entry, gate = _case(batch=1, q_len=40, kv_len=80, picks=2, skip_rows=12, seed=7)
    dev = lambda *ts: [t.to(triton_target) for t in ts]
    got = landmark_block_attention(*dev(q, k, v, lists, counts, entry, gate), block=16, local_blocks=1, scale=0.25,
                                   backend="triton").cpu()
    none = torch.zeros(1, 4, 40, 0)
    alone = landmark_block_attention(*dev(q, k, v, lists[..., :1] * 0, counts * 0, none.long(), none), block=16,
                                     local_blocks=1, scale=0.25, backend="triton").cpu()
    pos = torch.arange(40, 80)
    keys = torch.arange(80)
    local = (keys[None] <= pos[:, None]) & (keys[None] // 16 == (pos // 16)[:, None])
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.25).masked_fill(~local, float("-inf"))
    want = torch.softmax(scores, -1) @ v.repeat_interleave(2, 1)
    assert (alone - want).abs().max().item() <= 2e-6
    assert (got[:, :, :12] - want[:, :, :12]).abs().max().item() <= 2e-6  # the 12 rows that picked nothing
    assert (got[:, :, 20:] - want[:, :, 20:]).abs().max().item() > 1e-3  # rows that retrieved blocks


def test_bad_arguments_are_refused_clearly():
    q, k, v, lists, counts, entry, gate = _case(batch=1, q_len=20, kv_len=40)
    kw = {"block": 16, "local_blocks": 1}
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        landmark_block_attention(q[:, :3], k, v, lists, counts, entry, gate, **kw)
    with pytest.raises(ValueError, match="must be <= Tk"):
        landmark_block_attention(q, k[:, :, :10], v[:, :, :10], lists, counts, entry, gate, **kw)
    with pytest.raises(ValueError, match="kv_indices must be"):
        landmark_block_attention(q, k, v, lists[:, :, :1], counts, entry, gate, **kw)
    with pytest.raises(ValueError, match="pick_entry"):
        landmark_block_attention(q, k, v, lists, counts, entry[:, :, :3], gate, **kw)
    with pytest.raises(ValueError, match="power of 2"):
        landmark_block_attention(q, k, v, lists, counts, entry, gate, block=24, local_blocks=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        landmark_block_attention(q, k, v, lists, counts, entry, gate, **kw, backend="cuda")
    with pytest.warns(UserWarning, match="forward only"):
        out = landmark_block_attention(q.requires_grad_(), k, v, lists, counts, entry, gate, **kw, backend="torch")
    assert not out.requires_grad
