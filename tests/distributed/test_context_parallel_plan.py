"""The load-balancing plan of context-parallel prefill (no processes needed), and its place in the layers."""

from __future__ import annotations

import math

import pytest
import torch

from patchattn.distributed import plan_shards
from patchattn.distributed.plan import block_rows_work


def _brute_work(chunks, block: int) -> int:
    """Causal block pairs, counted one query block at a time."""
    return sum(q + 1 for start, stop in chunks for q in range(start // block, math.ceil(stop / block)))


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_balances_causal_work_within_one_block_row(world):
    block = 16
    for n in range(world, 160):
        tokens = n * block - 5  # a partial last block
        plan = plan_shards(tokens, world, block, "zigzag")
        work = [_brute_work(plan.chunks[r], block) for r in range(world)]
        assert work == [plan.causal_work(r) for r in range(world)]
        assert sum(work) == n * (n + 1) // 2
        assert max(work) - min(work) <= n, (n, work)  # at most one query block's row of key blocks apart
        assert all(len(plan.chunks[r]) <= 2 for r in range(world))  # a front run and a back run


def test_zigzag_is_much_more_even_than_the_contiguous_split():
    n, block = 64, 128
    zig, flat = (plan_shards(n * block, 2, block, b) for b in ("zigzag", "contiguous"))
    assert [zig.causal_work(r) for r in range(2)] == [1040, 1040]
    assert [flat.causal_work(r) for r in range(2)] == [528, 1552]
    assert zig.chunks == (((0, 16 * block), (48 * block, 64 * block)), ((16 * block, 48 * block),))


def test_chunks_cover_the_prompt_once_in_whole_blocks():
    plan = plan_shards(133, 2, 16)
    positions = torch.cat([plan.positions(r) for r in range(2)])
    assert sorted(positions.tolist()) == list(range(133))
    for rank_chunks in plan.chunks:
        for start, stop in rank_chunks:
            assert start % 16 == 0 and (stop % 16 == 0 or stop == 133)
    index = plan.gather_index()
    width = plan.max_local_length
    for r in range(2):  # position p sits at rank r's slot of the padded all-gather layout
        assert torch.equal(index[plan.positions(r)], r * width + torch.arange(plan.local_length(r)))


def test_block_rows_work_and_errors():
    assert block_rows_work(0, 4) == 1 + 2 + 3 + 4
    assert block_rows_work(2, 4) == 3 + 4
    with pytest.raises(ValueError, match="balance must be one of zigzag, contiguous"):
        plan_shards(100, 2, 16, "striped")
    with pytest.raises(ValueError, match="needs at least 4 blocks"):
        plan_shards(40, 4, 16)


def test_distributed_sits_at_the_api_level():
    # patchattn/distributed may use api and methods; nothing at or below that level imports it.
    from tests.test_layers import EDGES, _top

    below = ("kernels", "masks", "methods", "adapters", "api", "config", "registry", "state", "checks")
    above = ("train", "eval", "bench", "cli", "calibrate", "demo", "lm_eval", "tasks")
    bad = [f"{s} -> {d}" for s, d, _ in EDGES
           if (_top(s) in below and _top(d) == "distributed") or (_top(s) == "distributed" and _top(d) in above)]
    assert not bad, bad
    assert ("distributed", "api") in {(_top(s), _top(d)) for s, d, _ in EDGES}


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_offset_causal_attention_is_bottom_right_causal(softcap):
    # A chunk's dense call: queries are the last 40 of 100 keys (GQA 4:2), with and without soft-capping.
    from patchattn.distributed.context_parallel import offset_causal_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, t, 8, generator=gen) for h, t in ((4, 40), (2, 100), (2, 100)))
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 8 ** -0.5
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = torch.ones(40, 100, dtype=torch.bool).tril(60)  # query i sits at key position 60 + i
    want = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v.repeat_interleave(2, dim=1)
    got = offset_causal_attention(q, k, v, scaling=8 ** -0.5, softcap=softcap, backend="torch", block=16)
    assert torch.allclose(got, want.transpose(1, 2), atol=1e-5)


def test_ring_attention_merge_of_disjoint_key_parts_is_the_whole_attention():
    # Keys [0, 48) seen whole, then the chunk's own keys [48, 80) causally: merged = causal rows 48..79 of 80 keys.
    from patchattn.distributed.ring_attention import merge, partial_attention

    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 32, 8, generator=gen)
    k, v = torch.randn(1, 2, 80, 8, generator=gen), torch.randn(1, 2, 80, 8, generator=gen)
    run = dict(scaling=0.3, softcap=None, backend="torch", block=16)
    before = partial_attention(q, k[:, :, :48], v[:, :, :48], causal=False, **run)
    own = partial_attention(q, k[:, :, 48:], v[:, :, 48:], causal=True, **run)
    out, lse = merge(merge(None, own), before)
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3
    visible = torch.ones(32, 80, dtype=torch.bool).tril(48)
    scores = scores.masked_fill(~visible, float("-inf"))
    assert torch.allclose(out, scores.softmax(-1) @ v.repeat_interleave(2, dim=1), atol=1e-5)
    assert torch.allclose(lse, scores.logsumexp(-1), atol=1e-5)
    empty = (torch.zeros(1, 4, 32, 8), torch.full((1, 4, 32), float("-inf")))  # a part no row sees: no change
    assert torch.allclose(merge(empty, (out, lse))[0], out) and torch.allclose(merge((out, lse), empty)[1], lse)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_window_tails_cover_every_band(world):
    # A sliding-window layer exchanges only each chunk's last `reach` tokens: with a rank's own tokens they must
    # cover the `reach` keys before every chunk's start (bands shorter and longer than a chunk).
    for tokens, block, reach in ((133, 16, 7), (133, 16, 23), (300, 16, 70), (97, 32, 5)):
        for balance in ("zigzag", "contiguous"):
            plan = plan_shards(tokens, world, block, balance)
            tails = [plan.tails(r, reach) for r in range(world)]
            for r in range(world):
                positions, local = tails[r]
                assert torch.equal(plan.positions(r)[local], positions)
            shared = set(torch.cat([p for p, _ in tails]).tolist())
            for r in range(world):
                held = shared | set(plan.positions(r).tolist())
                for start, _ in plan.chunks[r]:
                    assert set(range(max(0, start - reach), start)) <= held, (tokens, reach, balance, r, start)
            assert len(shared) <= reach * sum(len(c) for c in plan.chunks)  # what travels: tails only
