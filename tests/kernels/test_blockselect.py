"""Block selection (kernels/blockselect): each entry point's torch path (blockselect/reference.py) against a
brute-force oracle, Triton against torch through the same entry points, and the decode choice against the prefill
choice for the same last query row.  No method code: the methods' use of these is tested in tests/methods."""
import pytest
import torch
from select_cases import SELECT_CASES, select_case_id

from patchattn.kernels.blockselect import (
    decode_block_topk,
    max_list_width,
    prefill_block_choice,
    prefill_block_scores,
    prefill_block_select,
    prefill_tree_search,
    tree_search_torch,
)
from patchattn.kernels.blocksparse import mask_from_blocks

CASES = [  # B, Hq, Hkv, D, NK, top_k, mass, per_head, reduce, query scale
    (2, 8, 2, 64, 37, 5, 1.0, True, "max", 1.0),
    (2, 8, 2, 64, 37, 5, 0.9, True, "max", 6.0),
    (1, 4, 4, 32, 3, 5, 0.97, True, "max", 1.0),  # every block forced
    (3, 6, 2, 48, 100, 10, 0.8, False, "max", 4.0),
    (3, 6, 2, 48, 100, 10, 0.8, False, "mean", 4.0),
    (1, 4, 1, 128, 300, 24, 0.5, True, "max", 8.0),  # MQA, peaked scores: the mass stops early
    (1, 2, 1, 16, 1, 4, 0.97, True, "max", 1.0),  # a single block
    # mass 1.0 (the decode default): the threshold (bisection) path of the Triton kernel
    (1, 4, 1, 128, 300, 24, 1.0, True, "max", 8.0),
    (3, 6, 2, 48, 100, 10, 1.0, False, "mean", 4.0),
    (1, 4, 4, 32, 3, 5, 1.0, True, "max", 1.0),  # every block forced
    (2, 4, 2, 32, 70, 80, 1.0, True, "max", 1.0),  # top_k above the candidates: all blocks
]


def oracle(q, k_means, top_k, sink, local, mass, per_head, reduce):
    """Loop-by-loop definition: forced blocks, then the best others while the estimated mass is below ``mass``."""
    b, hq, d = q.shape
    hkv, n_k = k_means.shape[1], k_means.shape[2]
    g = hq // hkv
    heads = hq if per_head else hkv
    chosen = torch.zeros(b, heads, n_k, dtype=torch.bool)
    for bi in range(b):
        for h in range(heads):
            if per_head:
                s = k_means[bi, h // g].double() @ q[bi, h].double()
            else:
                all_s = k_means[bi, h].double() @ q[bi, h * g:(h + 1) * g].double().T  # [NK, G]
                s = all_s.amax(1) if reduce == "max" else all_s.mean(1)
            p = torch.softmax(s / d**0.5, 0)
            forced = [j for j in range(n_k) if j < sink or j > n_k - 1 - local]
            acc = float(p[forced].sum())
            chosen[bi, h, forced] = True
            for j in sorted(set(range(n_k)) - set(forced), key=lambda j: -float(s[j]))[:top_k]:
                if mass < 1.0 and acc >= mass:
                    break
                chosen[bi, h, j] = True
                acc += float(p[j])
    return chosen


def block_means(x, block):
    """``[B, H, T, D]`` -> ``[B, H, ceil(T / block), D]`` fp32 mean of each block's real rows (a loop: the oracle)."""
    n = -(-x.shape[2] // block)
    return torch.stack([x[:, :, i * block:(i + 1) * block].float().mean(dim=2) for i in range(n)], dim=2)


def _inputs(case, device="cpu"):
    b, hq, hkv, d, n_k, *_rest, scale = case
    gen = torch.Generator().manual_seed(n_k * 7 + hq)
    q = torch.randn(b, hq, d, generator=gen) * scale
    return q.to(device), torch.randn(b, hkv, n_k, d, generator=gen).to(device)


def _run(case, backend, device="cpu"):
    _b, _hq, _hkv, _d, n_k, top_k, mass, per_head, reduce, _ = case
    q, k_means = _inputs(case, device)
    idx, counts = decode_block_topk(q, k_means, top_k=top_k, mass=mass, per_head=per_head, reduce=reduce,
                                    backend=backend)
    assert idx.shape[-1] == max_list_width(n_k, top_k, 1, 2)
    assert (counts <= idx.shape[-1]).all()
    valid = torch.arange(idx.shape[-1], device=idx.device) < counts[..., None]
    listed = torch.where(valid, idx, -1)[..., 0, :]
    for row, cnt in zip(listed.flatten(0, 1), counts.flatten()):
        entries = row[: int(cnt)]
        assert torch.equal(entries, entries.sort().values) and len(set(entries.tolist())) == len(entries)
        assert (row[int(cnt):] == -1).all()
    return idx, counts, mask_from_blocks(idx, counts, n_k)[:, :, 0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"nk{c[4]}-k{c[5]}-m{c[6]}-{'head' if c[7] else c[8]}")
def test_torch_selection_matches_oracle(case):
    _b, _hq, _hkv, _d, _n_k, top_k, mass, per_head, reduce, _ = case
    q, k_means = _inputs(case)
    _idx, _counts, mask = _run(case, "torch")
    assert torch.equal(mask, oracle(q, k_means, top_k, 1, 2, mass, per_head, reduce))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"nk{c[4]}-k{c[5]}-m{c[6]}-{'head' if c[7] else c[8]}")
def test_triton_selection_matches_torch(case, triton_device):
    want = _run(case, "torch")
    got = _run(case, "triton", triton_device)
    assert torch.equal(got[1].cpu(), want[1])
    assert torch.equal(got[2].cpu(), want[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_head", [True, False])
def test_triton_selection_matches_torch_with_16_bit_means(dtype, per_head, triton_device):
    """Queries and means in the cache's own 16-bit dtype (what a bf16 model stores): the kernel multiplies them
    natively on tensor cores with fp32 sums and must pick what the torch path picks from the same values."""
    gen = torch.Generator().manual_seed(5)
    q = (torch.randn(2, 8, 64, generator=gen) * 4).to(dtype)
    k_means = torch.randn(2, 2, 300, 64, generator=gen).to(dtype)
    want = decode_block_topk(q, k_means, top_k=12, per_head=per_head, backend="torch")
    got = decode_block_topk(q.to(triton_device), k_means.to(triton_device), top_k=12, per_head=per_head,
                            backend="triton")
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])


@pytest.mark.parametrize("kv_len", [152, 153, 159])  # a block just started, one row in, the block nearly full
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tail_mean_is_refreshed_before_scoring(kv_len, per_head, dtype, triton_device, monkeypatch):
    """With ``keys``, the newest block's mean is recomputed from them (stale row in, exact mean out, rounded to the
    cache's dtype) and the lists score that fresh mean; both backends agree.  Chunks of 16 blocks: the 19-20
    blocks take two programs per KV head, the second owning the newest block."""
    from patchattn.kernels.blockselect import triton_select

    monkeypatch.setattr(triton_select, "SCORE_CHUNK", 16)
    gen = torch.Generator().manual_seed(kv_len)
    keys = torch.randn(1, 2, kv_len, 32, generator=gen).to(dtype)
    fresh = block_means(keys, 8).to(dtype)
    q = (torch.randn(1, 4, 32, generator=gen) * 4).to(dtype)
    want = decode_block_topk(q, fresh, top_k=2, per_head=per_head, backend="torch")
    for backend, device in (("torch", "cpu"), ("triton", triton_device)):
        stale = fresh.clone()
        stale[:, :, -1] = 100.0  # what the cache held before this step
        stale = stale.to(device)
        idx, counts = decode_block_topk(q.to(device), stale, top_k=2, per_head=per_head, keys=keys.to(device),
                                        block=8, backend=backend)
        torch.testing.assert_close(stale.cpu(), fresh, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-6)
        assert torch.equal(counts.cpu(), want[1]) and torch.equal(idx.cpu(), want[0])
    with pytest.raises(ValueError, match="last of the"):
        decode_block_topk(q, fresh, top_k=2, keys=keys[:, :, :100], block=8)


def test_threshold_top_k_breaks_ties_by_lowest_index_and_handles_signs(triton_device):
    """Many equal scores (ties at the k-th value), negative and positive values, -0.0 and +0.0: the Triton kernel
    picks what a stable descending sort picks (the oracle's rule)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.zeros(1, 2, 8)
    q[..., 0] = 1.0
    k_means = torch.zeros(1, 1, 500, 8)
    k_means[..., 0] = torch.randint(-3, 4, (1, 1, 500), generator=gen).float() * 0.5
    k_means[0, 0, 10:20, 0] = -0.0
    for top_k in (7, 497):
        got = decode_block_topk(q.to(triton_device), k_means.to(triton_device), top_k=top_k, backend="triton")
        mask = mask_from_blocks(got[0].cpu(), got[1].cpu(), 500)[:, :, 0]
        assert torch.equal(mask, oracle(q, k_means, top_k, 1, 2, 1.0, True, "max")), top_k


def test_bad_shapes_are_refused_with_the_expected_layout():
    with pytest.raises(ValueError, match=r"q \[B, Hq, D\]"):
        decode_block_topk(torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), top_k=2)
    with pytest.raises(ValueError, match="multiple"):
        decode_block_topk(torch.randn(1, 3, 8), torch.randn(1, 2, 5, 8), top_k=2)
    with pytest.raises(ValueError, match="reduce"):
        decode_block_topk(torch.randn(1, 4, 8), torch.randn(1, 2, 5, 8), top_k=2, reduce="sum")


PREFILL_CASES = [  # B, Hq, Hkv, Tq, Tk, block, D, per_head, dtype
    (1, 4, 2, 150, 150, 32, 32, True, torch.float32),
    (2, 4, 2, 150, 150, 32, 32, False, torch.float32),
    (1, 2, 1, 70, 200, 16, 48, True, torch.float32),  # queries at the end of a longer cache, padded head_dim
    (1, 4, 1, 130, 130, 64, 64, False, torch.bfloat16),
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"T{c[3]}x{c[4]}-b{c[5]}-d{c[6]}-{'head' if c[7] else 'group'}-{str(c[8])[6:]}")
def test_prefill_block_scores_match_the_torch_path(case, triton_device):
    """Each query block's best row x key-block mean, on and before the causal diagonal (after it: -inf): the torch
    path against a loop over query blocks, rows and heads, and the Triton kernel against the torch path."""
    b, hq, hkv, tq, tk, block, d, per_head, dtype = case
    gen = torch.Generator().manual_seed(tq + tk)
    query = torch.randn(b, hq, tq, d, generator=gen).to(dtype)
    k_means = block_means(torch.randn(b, hkv, tk, d, generator=gen), block)
    want = prefill_block_scores(query.float(), k_means, block_q=block, block_k=block, kv_len=tk, per_head=per_head,
                                backend="torch")
    assert want.dtype == torch.float32
    group, n_q, n_k = hq // hkv, -(-tq // block), k_means.shape[2]
    for m in range(n_q):
        diagonal = (min((m + 1) * block, tq) - 1 + tk - tq) // block
        rows = query.float()[:, :, m * block:(m + 1) * block]  # [B, Hq, R, D]
        per_q_head = (rows @ k_means.repeat_interleave(group, 1).transpose(-1, -2)).amax(dim=2)  # [B, Hq, NK]
        best = per_q_head if per_head else per_q_head.view(b, hkv, group, n_k).amax(dim=2)
        torch.testing.assert_close(want[:, :, m, :diagonal + 1], best[..., :diagonal + 1], rtol=1e-5, atol=1e-5)
        assert torch.isneginf(want[:, :, m, diagonal + 1:]).all()
    got = prefill_block_scores(query.to(triton_device), k_means.to(triton_device), block_q=block, block_k=block,
                               kv_len=tk, per_head=per_head, backend="triton").cpu()
    allowed = torch.isfinite(want)
    tol = 1e-4 if dtype == torch.float32 else 0.05
    assert torch.allclose(got[allowed], want[allowed], atol=tol, rtol=tol)
    assert torch.isneginf(got[~allowed]).all()


TREE_CASES = [  # B, Hq, Hkv, Tq, Tk, block, D, k, per_head, dtype
    (1, 2, 1, 150, 150, 16, 32, 4, True, torch.float32),
    (1, 2, 1, 70, 300, 16, 48, 3, True, torch.float32),  # queries at the end of a longer cache, padded head_dim
    (1, 4, 2, 200, 200, 16, 32, 5, False, torch.float32),  # one search per GQA group: best row of the group
    (1, 2, 2, 256, 256, 32, 64, 20, True, torch.bfloat16),  # k above every query block's visible blocks: no round
    (1, 1, 1, 400, 400, 16, 16, 4, True, torch.bfloat16),  # 25 blocks, 3 rounds
    pytest.param((2, 8, 2, 4096, 4096, 64, 128, 10, True, torch.bfloat16), marks=pytest.mark.gpu),
    pytest.param((1, 8, 2, 3000, 5000, 64, 64, 10, False, torch.bfloat16), marks=pytest.mark.gpu),
]


def _tree_case_id(c):
    c = c.values[0] if hasattr(c, "values") else c
    return f"T{c[3]}x{c[4]}-b{c[5]}-d{c[6]}-k{c[7]}-{'head' if c[8] else 'group'}-{str(c[9])[6:]}"


@pytest.mark.parametrize("case", TREE_CASES, ids=_tree_case_id)
def test_tree_search_kernel_matches_the_torch_search(case, triton_device):
    """HiP's search in one Triton program per query block keeps the same blocks as the torch rounds (same integer
    segments, fp32 scores; random scores have no ties)."""
    b, hq, hkv, tq, tk, block, d, k, per_head, dtype = case
    gen = torch.Generator().manual_seed(tq + tk + k)
    query = torch.randn(b, hq, tq, d, generator=gen).to(dtype)
    k_means = block_means(torch.randn(b, hkv, tk, d, generator=gen), block).to(dtype)
    want = prefill_tree_search(query, k_means, block_q=block, block_k=block, kv_len=tk, k=k, per_head=per_head,
                               backend="torch")
    got = prefill_tree_search(query.to(triton_device), k_means.to(triton_device), block_q=block, block_k=block,
                              kv_len=tk, k=k, per_head=per_head, backend="triton").cpu()
    assert got.shape == want.shape == (b, hq if per_head else hkv, -(-tq // block), k_means.shape[2])
    diagonal = (torch.clamp((torch.arange(want.shape[2]) + 1) * block, max=tq) - 1 + tk - tq) // block
    visible = (diagonal + 1).clamp(max=k)
    assert torch.equal(want.sum(-1), visible.expand_as(want.sum(-1))), "k blocks, or every visible one"
    assert torch.equal(got, want)


def test_tree_search_keeps_every_visible_block_when_there_are_at_most_k():
    """Early query blocks see fewer than k blocks: all of them are kept (an empty segment must not erase a chosen
    block when the choice is scattered into the mask)."""
    gen = torch.Generator().manual_seed(0)
    n = 40
    chosen = tree_search_torch(torch.randn(1, 2, n, 4, 16, generator=gen), torch.randn(1, 2, n, 16, generator=gen),
                               torch.arange(n), 10)
    assert torch.equal(chosen.sum(-1), (torch.arange(n) + 1).clamp(max=10).expand(1, 2, n))
    assert not chosen.triu(1).any(), "never a block after the diagonal"






def _prefill_choice_inputs(case):
    tq, tk, block, per_head, top_k, mass, last = case
    gen = torch.Generator().manual_seed(tq + tk + top_k)
    query, keys = torch.randn(1, 4, tq, 32, generator=gen) * 2, torch.randn(1, 2, tk, 32, generator=gen)
    scores = prefill_block_scores(query, block_means(keys, block), block_q=block, block_k=block, kv_len=tk,
                                  per_head=per_head, backend="torch")
    choice = dict(q_len=tq, block_q=block, block_k=block, kv_len=tk, top_k=top_k, sink_blocks=1, local_blocks=2,
                  mass=mass, head_dim=32)
    return scores, choice, last


@pytest.mark.parametrize("case", SELECT_CASES[:5], ids=select_case_id)
def test_prefill_block_choice_matches_the_loop_oracle(case):
    """The torch choice per query block: sink and local blocks, then the best others while the estimated mass of the
    visible blocks is below ``mass`` (at most ``top_k``), nothing after the diagonal."""
    scores, choice, _last = _prefill_choice_inputs(case)
    chosen = prefill_block_choice(scores, **choice)
    _b, h, n_q, _n_k = scores.shape
    for m in range(n_q):
        n_vis = int(torch.isfinite(scores[0, 0, m]).sum())
        for head in range(h):
            row = scores[0, head, m, :n_vis].double()
            p = torch.softmax(row / 32**0.5, 0)
            forced = [j for j in range(n_vis) if j < 1 or j > n_vis - 1 - 2]
            want, acc = set(forced), float(p[forced].sum())
            for j in sorted(set(range(n_vis)) - set(forced), key=lambda j: -float(row[j]))[:choice["top_k"]]:
                if choice["mass"] < 1.0 and acc >= choice["mass"]:
                    break
                want.add(j)
                acc += float(p[j])
            assert set(torch.nonzero(chosen[0, head, m]).flatten().tolist()) == want, (m, head)


@pytest.mark.parametrize("case", SELECT_CASES, ids=select_case_id)
def test_prefill_block_select_kernel_matches_the_torch_lists(case, triton_device):
    """Scores -> lists in one Triton program per query block (sink + local, then the top-k or the mass budget, the
    dense last block) equal the torch path's lists (its mask-based choice, then mask -> lists), padding included."""
    scores, choice, last = _prefill_choice_inputs(case)
    want = prefill_block_select(scores, **choice, last_block_dense=last, backend="torch")
    got = prefill_block_select(scores.to(triton_device), **choice, last_block_dense=last, backend="triton")
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])
    mask = prefill_block_choice(scores, **choice)
    if last and scores.shape[2] > 1:
        mask[..., -1, :] = torch.isfinite(scores[..., -1, :])
    assert torch.equal(mask_from_blocks(*want, scores.shape[-1]), mask)
    assert torch.equal(want[1], mask.sum(-1, dtype=torch.int32)), "counts match the listed blocks"


def test_decode_lists_match_the_prefill_choice_for_the_same_row():
    """The decode selection for one query row picks what the prefill choice picks for a one-block query of that row
    (the same scores, forced blocks and mass rule)."""
    gen = torch.Generator().manual_seed(0)
    q, keys = torch.randn(1, 4, 32, generator=gen) * 3, torch.randn(1, 2, 150, 32, generator=gen)
    k_means = block_means(keys, 16)
    for mass in (1.0, 0.9):
        idx, counts = decode_block_topk(q, k_means, top_k=3, mass=mass, backend="torch")
        two_rows = q[:, :, None].expand(-1, -1, 2, -1)  # a query block of two equal rows: its best row is that row
        scores = prefill_block_scores(two_rows, k_means, block_q=16, block_k=16, kv_len=150, backend="torch")
        chosen = prefill_block_choice(scores, q_len=2, block_q=16, block_k=16, kv_len=150, top_k=3, sink_blocks=1,
                                      local_blocks=2, mass=mass, head_dim=32)
        assert torch.equal(mask_from_blocks(idx, counts, k_means.shape[2]), chosen), mass


def test_entry_points_take_explicit_launch_options(triton_device):
    """``options=`` reaches the kernels (warps, stages, poisoned outputs) and leaves the result unchanged."""
    from patchattn.kernels import KernelOptions

    gen = torch.Generator().manual_seed(4)
    query = torch.randn(1, 2, 150, 32, generator=gen).to(triton_device)
    k_means = block_means(torch.randn(1, 1, 150, 32, generator=gen), 16).to(triton_device)
    args = dict(block_q=16, block_k=16, kv_len=150, k=4, backend="triton")
    tuned = KernelOptions(tree_warps=8, tree_stages=2, poison_outputs=True)
    assert torch.equal(prefill_tree_search(query, k_means, **args, options=tuned),
                       prefill_tree_search(query, k_means, **args))
    q = query[:, :, -1]
    picked = decode_block_topk(q, k_means, top_k=3, backend="triton",
                               options=KernelOptions(score_warps=2, select_warps=8, pdl=False, poison_outputs=True))
    default = decode_block_topk(q, k_means, top_k=3, backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(picked, default))


# ---- rows of different lengths (lengths=, starts=): a padded batch or a static cache's empty slots ----------------
ROW_CASES = [  # Hq, Hkv, D, block, lengths, top_k, mass, per_head, reduce
    (4, 2, 32, 8, [37, 8, 1, 61], 2, 1.0, True, "max"),  # odd lengths, a one-key row, one row starts a block
    (4, 2, 32, 8, [37, 0, 64, 9], 3, 0.9, False, "max"),  # an empty row, GQA groups, a mass budget
    (6, 2, 16, 16, [150, 17, 160, 33], 4, 1.0, False, "mean"),
    (4, 4, 32, 8, [5, 100, 23], 30, 1.0, True, "max"),  # top_k above a short row's candidates
]


def _row_inputs(case, capacity_blocks=None):
    hq, hkv, d, block, lengths, *_ = case
    gen = torch.Generator().manual_seed(sum(lengths) + hq)
    n_k = capacity_blocks or -(-max(lengths) // block) + 2  # room beyond the longest row, as a static cache leaves
    lengths = torch.tensor(lengths, dtype=torch.int32)
    starts = torch.tensor([(3 * i) % 7 for i in range(len(lengths))], dtype=torch.int32)  # rows start late (padding)
    keys = torch.randn(len(lengths), hkv, int(starts.max()) + n_k * block, d, generator=gen)
    q = torch.randn(len(lengths), hq, d, generator=gen) * 3
    return q, keys, starts, lengths, n_k


def _fresh_row_means(keys, starts, lengths, block, n_k):
    """``[B, Hkv, n_k, D]`` each row's block means (a loop: the oracle), zeros past its keys."""
    rows = []
    for r in range(len(lengths)):
        n = int(lengths[r])
        means = torch.zeros(keys.shape[1], n_k, keys.shape[3])
        if n:
            own = block_means(keys[r:r + 1, :, int(starts[r]):int(starts[r]) + n], block)[0]
            means[:, :own.shape[1]] = own
        rows.append(means)
    return torch.stack(rows)


def _row_alone(case, q, keys, starts, lengths, row):
    """Row ``row``'s lists when it is alone: its own keys, every block of its cache valid (the existing path)."""
    _hq, _hkv, _d, block, _l, top_k, mass, per_head, reduce = case
    n = int(lengths[row])
    if n == 0:
        return None
    own = keys[row:row + 1, :, int(starts[row]):int(starts[row]) + n]
    return decode_block_topk(q[row:row + 1], block_means(own, block), top_k=top_k, mass=mass, per_head=per_head,
                             reduce=reduce, backend="torch")


def _assert_rows_alone(case, got, q, keys, starts, lengths):
    idx, counts = (t.cpu() for t in got)
    for row in range(len(lengths)):
        alone = _row_alone(case, q, keys, starts, lengths, row)
        if alone is None:
            assert (counts[row] == 0).all(), f"row {row} is empty but reads {counts[row].flatten().tolist()}"
            continue
        width = alone[0].shape[-1]
        assert torch.equal(counts[row:row + 1], alone[1]), f"row {row}"
        valid = torch.arange(idx.shape[-1]) < counts[row:row + 1, ..., None]
        assert torch.equal(torch.where(valid, idx[row:row + 1], -1)[..., :width],
                           torch.where(valid[..., :width], alone[0], -1)), f"row {row}"


@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: f"b{c[3]}-k{c[5]}-m{c[6]}-{'head' if c[7] else c[8]}")
def test_rows_of_different_lengths_read_what_each_row_reads_alone(case):
    """``lengths=`` / ``starts=`` (torch path): each row selects among its own valid blocks only -- its sinks from
    its first key, its newest block local -- exactly as the row alone; an empty row reads nothing; with ``keys``, the
    stale newest block of each row is refreshed in place first."""
    block = case[3]
    q, keys, starts, lengths, n_k = _row_inputs(case)
    fresh = _fresh_row_means(keys, starts, lengths, block, n_k)
    args = dict(top_k=case[5], mass=case[6], per_head=case[7], reduce=case[8], block=block, lengths=lengths,
                starts=starts, backend="torch")
    _assert_rows_alone(case, decode_block_topk(q, fresh, **args), q, keys, starts, lengths)
    stale = fresh.clone()
    newest = ((lengths + block - 1) // block - 1).clamp(min=0)
    stale[torch.arange(len(lengths)), :, newest] = 50.0
    stale[..., n_k - 1:, :] = float("nan")  # columns past every row must not matter
    got = decode_block_topk(q, stale, keys=keys, **args)
    _assert_rows_alone(case, got, q, keys, starts, lengths)
    nonempty = lengths > 0
    torch.testing.assert_close(stale[nonempty][:, :, :n_k - 1], fresh[nonempty][:, :, :n_k - 1])


@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: f"b{c[3]}-k{c[5]}-m{c[6]}-{'head' if c[7] else c[8]}")
def test_triton_rows_of_different_lengths_match_torch(case, triton_device, monkeypatch):
    """The Triton selection with ``lengths=`` / ``starts=`` / ``keys=``: the same lists and refreshed means as the
    torch path (chunks of 4 blocks, so a row's newest block is owned by different programs for different rows)."""
    from patchattn.kernels.blockselect import triton_select

    monkeypatch.setattr(triton_select, "SCORE_CHUNK", 4)
    block = case[3]
    q, keys, starts, lengths, n_k = _row_inputs(case)
    means = _fresh_row_means(keys, starts, lengths, block, n_k)
    means[torch.arange(len(lengths)), :, ((lengths + block - 1) // block - 1).clamp(min=0)] = -7.0  # stale
    args = dict(top_k=case[5], mass=case[6], per_head=case[7], reduce=case[8], block=block)
    want_means = means.clone()
    want = decode_block_topk(q, want_means, keys=keys, lengths=lengths, starts=starts, backend="torch", **args)
    got_means = means.clone().to(triton_device)
    got = decode_block_topk(q.to(triton_device), got_means, keys=keys.to(triton_device),
                            lengths=lengths.to(triton_device), starts=starts.to(triton_device), backend="triton",
                            **args)
    nonempty = lengths > 0
    torch.testing.assert_close(got_means.cpu()[nonempty], want_means[nonempty])
    assert torch.equal(got[1].cpu(), want[1])
    valid = torch.arange(want[0].shape[-1]) < want[1][..., None]
    assert torch.equal(torch.where(valid, got[0].cpu(), -1), torch.where(valid, want[0], -1))
    _assert_rows_alone(case, got, q, keys, starts, lengths)


def test_rows_need_the_block_size_and_one_length_per_row():
    q, k_means = torch.randn(2, 4, 8), torch.randn(2, 2, 5, 8)
    with pytest.raises(ValueError, match="block"):
        decode_block_topk(q, k_means, top_k=2, lengths=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"\[2\]"):
        decode_block_topk(q, k_means, top_k=2, lengths=torch.tensor([3]), block=4)
