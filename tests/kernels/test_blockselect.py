"""Decode-time block top-k (kernels/blockselect): the torch path against a brute-force oracle, Triton against torch,
and blocktopk's decode lists against what its prefill selection picks for the same last query row."""
import pytest
import torch

from patchattn.kernels.blockselect import decode_block_topk, max_list_width
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
    from patchattn.methods.blocktopk import block_means

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


def test_blocktopk_decode_steps_keep_the_key_cache_exact():
    """Token-by-token decoding (the cache grows by one row per step, across block starts) selects what a fresh
    selection without any cached means selects, and leaves the exact block means in the cache."""
    import patchattn
    from patchattn.masks import BlockGeometry
    from patchattn.methods.blocktopk import block_means, select_top_k
    from patchattn.state import PatchContext, PatchState

    torch.manual_seed(1)
    config = patchattn.get_config("blocktopk", block_size=16, top_k=3)
    state = PatchState(config, 0, "text", PatchContext())
    q, k = torch.randn(1, 4, 40, 32) * 3, torch.randn(1, 2, 120, 32)
    select_top_k(BlockGeometry(40, 94, 16, 16), q, k[:, :, :94], state)  # prefill fills the cache
    for t in range(95, 100):  # 97 starts a block
        got = select_top_k(BlockGeometry(1, t, 16, 16), q[:, :, -1:], k[:, :, :t], state)
        fresh_state = PatchState(config, 0, "text", PatchContext())
        want = select_top_k(BlockGeometry(1, t, 16, 16), q[:, :, -1:], k[:, :, :t], fresh_state)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), t
        torch.testing.assert_close(state.method_state.key_means.means, block_means(k[:, :, :t], 16))


def test_key_means_are_stored_in_the_keys_dtype_and_summed_in_fp32():
    """The compressed key cache of a bf16 model is bf16 (half the bytes a decode step's scoring reads) and equals
    the fp32 block means rounded once, also after decode steps that update it in place."""
    from patchattn.methods.blocktopk import block_means, key_block_means
    from patchattn.state import PatchContext, PatchState
    import patchattn

    torch.manual_seed(2)
    state = PatchState(patchattn.get_config("blocktopk", block_size=16), 0, "text", PatchContext())
    k = (torch.randn(1, 2, 100, 32) * 3 + 40).to(torch.bfloat16)  # large offset: bf16 sums would drift
    for t, q_len in ((90, 90), (91, 1), (97, 1)):
        means = key_block_means(state, k[:, :, :t], 16, q_len)
        assert means.dtype == torch.bfloat16
        assert torch.equal(means, block_means(k[:, :, :t], 16).to(torch.bfloat16)), t


@pytest.mark.parametrize("search", ["keys", "values"])
def test_threshold_top_k_breaks_ties_by_lowest_index_and_handles_signs(triton_device, search, monkeypatch):
    """Many equal scores (ties at the k-th value), negative and positive values, -0.0 and +0.0: the Triton kernel
    picks what a stable descending sort picks (the oracle's rule), with either pivot rule of the search."""
    from patchattn.kernels.blockselect import triton_select

    monkeypatch.setattr(triton_select, "SELECT_SEARCH", search)
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


def test_blocktopk_decode_lists_match_its_prefill_choice_for_the_last_row():
    """The decode path (lists straight from decode_block_topk) picks what the general (mask) path picks for a
    one-row query block: the same scores, forced blocks and mass rule."""
    import patchattn
    from patchattn.masks import BlockGeometry
    from patchattn.methods.blocktopk import select_top_k
    from patchattn.state import PatchContext, PatchState

    torch.manual_seed(0)
    state = PatchState(patchattn.get_config("blocktopk", block_size=16, top_k=3, mass=0.9, fused_select=False), 0,
                       "text", PatchContext())  # the mask path, whatever backend "auto" resolves to
    q, k = torch.randn(1, 4, 2, 32) * 3, torch.randn(1, 2, 150, 32)
    # Two query rows with the same content: a one-block prefill scored by its best row (= that row).
    two = select_top_k(BlockGeometry(2, 150, 16, 16), q[:, :, -1:].expand(-1, -1, 2, -1), k, state)
    idx, counts = select_top_k(BlockGeometry(1, 150, 16, 16), q[:, :, -1:], k, state)
    assert torch.equal(mask_from_blocks(idx, counts, two.shape[-1]), two)


def test_bad_shapes_are_refused_with_the_expected_layout():
    with pytest.raises(ValueError, match=r"q \[B, Hq, D\]"):
        decode_block_topk(torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8), top_k=2)
    with pytest.raises(ValueError, match="multiple"):
        decode_block_topk(torch.randn(1, 3, 8), torch.randn(1, 2, 5, 8), top_k=2)
    with pytest.raises(ValueError, match="reduce"):
        decode_block_topk(torch.randn(1, 4, 8), torch.randn(1, 2, 5, 8), top_k=2, reduce="sum")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["blocktopk", "hip", "streaming"])
def test_decode_step_has_no_host_sync_and_replays_from_a_cuda_graph(method):
    """A method's whole decode step (selection + kernel) runs without a device-to-host sync, so a CUDA graph can
    capture it; the replay reproduces the eager output."""
    from patchattn.bench.methods import _decode_steps, _select, _state

    torch.manual_seed(0)
    q = torch.randn(2, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 5000, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    state = _state(method, {})
    _select(method, state, q.expand(-1, -1, 2, -1), k)
    for step in _decode_steps(method, state, q, k, v).values():
        eager = step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


PREFILL_CASES = [  # B, Hq, Hkv, Tq, Tk, block, D, per_head, dtype
    (1, 4, 2, 150, 150, 32, 32, True, torch.float32),
    (2, 4, 2, 150, 150, 32, 32, False, torch.float32),
    (1, 2, 1, 70, 200, 16, 48, True, torch.float32),  # queries at the end of a longer cache, padded head_dim
    (1, 4, 1, 130, 130, 64, 64, False, torch.bfloat16),
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"T{c[3]}x{c[4]}-b{c[5]}-d{c[6]}-{'head' if c[7] else 'group'}-{str(c[8])[6:]}")
def test_prefill_block_scores_match_the_torch_path(case, triton_device):
    """Each query block's best row x key-block mean, on and before the causal diagonal (after it: -inf)."""
    from patchattn.kernels.blockselect import prefill_block_scores
    from patchattn.masks import BlockGeometry, causal_allowed
    from patchattn.methods.blocktopk import block_means, block_scores

    b, hq, hkv, tq, tk, block, d, per_head, dtype = case
    gen = torch.Generator().manual_seed(tq + tk)
    query = torch.randn(b, hq, tq, d, generator=gen).to(dtype)
    k_means = block_means(torch.randn(b, hkv, tk, d, generator=gen), block)
    g = BlockGeometry(tq, tk, block, block)
    want = block_scores(query.float(), k_means, g, "max", per_head, backend="torch").float()
    got = prefill_block_scores(query.to(triton_device), k_means.to(triton_device), block_q=block, block_k=block,
                               kv_len=tk, per_head=per_head, backend="triton").cpu()
    allowed = causal_allowed(g).expand_as(want)
    tol = 1e-4 if dtype == torch.float32 else 0.05
    assert torch.allclose(got[allowed], want[allowed], atol=tol, rtol=tol)
    assert torch.isneginf(got[~allowed]).all()


@pytest.mark.parametrize("per_head", [True, False])
def test_blocktopk_prefill_selection_is_the_same_with_the_fused_scores(per_head, triton_device):
    import patchattn
    from patchattn.masks import BlockGeometry
    from patchattn.methods.blocktopk import select_top_k
    from patchattn.state import PatchContext, PatchState

    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 300, 32, generator=gen) * 2, torch.randn(1, 2, 300, 32, generator=gen)
    g = BlockGeometry(300, 300, 16, 16)
    masks = {}
    for backend in ("torch", "triton"):
        config = patchattn.get_config("blocktopk", block_size=16, top_k=4, per_head=per_head, backend=backend,
                                      fused_scores=True, fused_select=False)  # masks from both (lists: next test)
        state = PatchState(config, 0, "text", PatchContext())
        masks[backend] = select_top_k(g, q.to(triton_device), k.to(triton_device), state).cpu()
    assert torch.equal(masks["triton"], masks["torch"])


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
    from patchattn.kernels.blockselect import prefill_tree_search, tree_search_torch
    from patchattn.masks import BlockGeometry
    from patchattn.methods.blocktopk import block_means
    from patchattn.methods.hip import query_rows

    b, hq, hkv, tq, tk, block, d, k, per_head, dtype = case
    gen = torch.Generator().manual_seed(tq + tk + k)
    query = torch.randn(b, hq, tq, d, generator=gen).to(dtype)
    k_means = block_means(torch.randn(b, hkv, tk, d, generator=gen), block).to(dtype)
    g = BlockGeometry(tq, tk, block, block)
    rows = query_rows(query, block, hkv, per_head, "max")
    means = k_means.repeat_interleave(hq // hkv, dim=1) if per_head else k_means
    want = tree_search_torch(rows, means, g.diagonal_block(), k, score_dtype=dtype)
    got = prefill_tree_search(query.to(triton_device), k_means.to(triton_device), block_q=block, block_k=block,
                              kv_len=tk, k=k, per_head=per_head, backend="triton").cpu()
    assert got.shape == want.shape
    visible = (g.diagonal_block() + 1).clamp(max=k)
    assert torch.equal(want.sum(-1), visible.expand_as(want.sum(-1))), "k blocks, or every visible one"
    assert torch.equal(got, want)


def test_tree_search_keeps_every_visible_block_when_there_are_at_most_k():
    """Early query blocks see fewer than k blocks: all of them are kept (an empty segment must not erase a chosen
    block when the choice is scattered into the mask)."""
    from patchattn.kernels.blockselect import tree_search_torch

    gen = torch.Generator().manual_seed(0)
    n = 40
    chosen = tree_search_torch(torch.randn(1, 2, n, 4, 16, generator=gen), torch.randn(1, 2, n, 16, generator=gen),
                               torch.arange(n), 10)
    assert torch.equal(chosen.sum(-1), (torch.arange(n) + 1).clamp(max=10).expand(1, 2, n))
    assert not chosen.triu(1).any(), "never a block after the diagonal"


SELECT_CASES = [  # Tq, Tk, block, per_head, top_k, mass, last_block_dense
    (300, 300, 16, True, 4, 1.0, True),
    (300, 300, 16, False, 4, 0.9, True),  # the adaptive budget
    (200, 500, 16, True, 3, 1.0, False),  # queries at the end of a longer cache
    (250, 250, 32, True, 100, 1.0, True),  # top_k above every row's candidates
    (90, 90, 16, True, 2, 0.5, False),
    pytest.param((8192, 8192, 64, True, 24, 0.97, True), marks=pytest.mark.gpu),  # the default at full size
    pytest.param((3000, 9000, 64, False, 24, 1.0, True), marks=pytest.mark.gpu),
]


def _select_case_id(c):
    c = c.values[0] if hasattr(c, "values") else c
    return f"T{c[0]}x{c[1]}-b{c[2]}-{'head' if c[3] else 'group'}-k{c[4]}-m{c[5]}-{'last' if c[6] else 'nolast'}"


@pytest.mark.parametrize("case", SELECT_CASES, ids=_select_case_id)
def test_blocktopk_prefill_lists_from_the_select_kernel_match_the_torch_choice(case, triton_device):
    """Scores -> lists in one Triton program per query block (sink + local, then the top-k or the mass budget, the
    dense last block) keeps the same blocks as the torch top-k, masks and lists."""
    import patchattn
    from patchattn.kernels.blocksparse import mask_from_blocks
    from patchattn.masks import BlockGeometry
    from patchattn.methods._sparse import mask_lists
    from patchattn.methods.blocktopk import select_top_k
    from patchattn.state import PatchContext, PatchState

    tq, tk, block, per_head, top_k, mass, last = case
    gen = torch.Generator().manual_seed(tq + tk + top_k)
    q, k = torch.randn(1, 4, tq, 32, generator=gen) * 2, torch.randn(1, 2, tk, 32, generator=gen)
    g = BlockGeometry(tq, tk, block, block)
    masks = {}
    for fused in (False, True):
        config = patchattn.get_config("blocktopk", block_size=block, top_k=top_k, mass=mass, per_head=per_head,
                                      last_block_dense=last, backend="triton", fused_select=fused)
        state = PatchState(config, 0, "text", PatchContext())
        chosen = select_top_k(g, q.to(triton_device), k.to(triton_device), state)
        idx, cnt = chosen if isinstance(chosen, tuple) else mask_lists(config, g, chosen, triton_device)
        assert isinstance(chosen, tuple) == fused
        masks[fused] = mask_from_blocks(idx.cpu(), cnt.cpu(), g.n_k)
        assert torch.equal(cnt.cpu(), masks[fused].sum(-1, dtype=torch.int32)), "counts match the listed blocks"
    assert torch.equal(masks[True], masks[False])


@pytest.mark.parametrize("layers", [1, 2])
def test_methods_benchmark_decode_rows_run_every_method_step(triton_device, monkeypatch, layers):
    """The decode part of `patchattn bench methods` end to end at a small size, timers replaced by one call each:
    every method's step (selection + kernel) runs, hip's search and reuse steps both, once per layer with the
    layer's own state, and the row has its per-layer ratios."""
    import patchattn.bench.methods as bench

    selected = []
    real_select = bench._select
    # The states themselves are kept (not their ids): a freed state's id can be reused by the next method's state.
    monkeypatch.setattr(bench, "_select", lambda name, state, *a: selected.append(state) or real_select(
        name, state, *a))
    monkeypatch.setattr(bench, "time_ms", lambda fn: (fn(), 2.0)[1])
    monkeypatch.setattr(bench, "graph_ms", lambda fn: (fn(), 1.0)[1])
    rows = bench.decode_rows(300, 2, bench.parse_methods("streaming,blocktopk,hip"), device=triton_device,
                             heads=(4, 2), head_dim=16, layers=layers)
    assert [r["method"] for r in rows] == ["streaming", "blocktopk", "hip"]
    for row in rows:
        assert 0 < row["density"] <= 1 and row["graph_speedup_vs_sdpa"] == 1.0 and row["speedup_vs_sdpa"] == 1.0
        assert row["layers"] == layers and row["sdpa_graph_ms"] == 1.0 / layers
    assert len({id(state) for state in selected}) == 3 * layers  # a state per method and layer
