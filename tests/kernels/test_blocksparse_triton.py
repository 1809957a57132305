"""Triton kernels (forward, backward, decode) against the torch reference.

Small sizes run everywhere (on CPU through the Triton interpreter, in CI); the ``gpu`` variants
repeat the same checks at full sizes on a CUDA device. Every output buffer is NaN-poisoned first
(conftest), so an element a kernel fails to write shows up as NaN.
"""
import contextlib
import dataclasses
import importlib

import pytest
import torch
from blocksparse_cases import Case, assert_close, bs, kernel_options, make_qkv, padding_bounds, random_blocks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

SMALL = [
    Case(),                                                                  # MHA, per-head lists
    Case(B=2, Hq=4, Hkv=2, Tq=50, Tk=70, block_q=16, block_k=32, list_heads="kv"),  # GQA, odd T
    Case(B=2, Hq=4, Hkv=1, Tq=40, Tk=40, list_heads="1", list_batch=False),  # MQA, shared list
    Case(B=1, Hq=2, Hkv=1, Tq=48, Tk=48, causal=False, density=0.3),         # non-causal
    Case(B=1, Hq=2, Hkv=2, Tq=32, Tk=32, D=48),                              # padded head_dim
]
LARGE = [
    Case(B=2, Hq=8, Hkv=2, Tq=1000, Tk=1000, D=128, block_q=64, block_k=64, list_heads="kv",
         density=0.3),
    Case(B=1, Hq=8, Hkv=1, Tq=2048, Tk=2048, D=64, block_q=128, block_k=128, list_heads="q",
         density=0.2),
    Case(B=2, Hq=4, Hkv=2, Tq=700, Tk=1500, D=256, block_q=64, block_k=64, density=0.4),
    Case(B=1, Hq=4, Hkv=4, Tq=1024, Tk=1024, D=96, block_q=128, block_k=64, causal=False,
         density=0.3),
]
CASES = [pytest.param(c, id=str(c)) for c in SMALL] + [
    pytest.param(c, id=str(c), marks=pytest.mark.gpu) for c in LARGE]


def run_both(case, dtype, device, *, grad=False, seed=0, **hooks):
    """(triton, torch) results: out, lse and, with grad, dq/dk/dv."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(case, dtype, device, gen)
    idx, cnt = random_blocks(case, device, gen)
    d_out = torch.randn(case.B, case.Hq, case.Tq, case.D, generator=gen).to(device, dtype)
    results = []
    for backend in ("triton", "torch"):
        qq, kk, vv = (t.clone().requires_grad_(grad) for t in (q, k, v))
        out, lse = bs.block_sparse_attention(qq, kk, vv, idx, cnt, block_q=case.block_q,
                                             block_k=case.block_k, causal=case.causal,
                                             return_lse=True, backend=backend, **hooks)
        res = {"out": out, "lse": lse}
        if grad:
            res.update(zip(("dq", "dk", "dv"), torch.autograd.grad(out, (qq, kk, vv), d_out)))
        results.append(res)
    return results


def check(results, dtype):
    got, want = results
    for name in got:
        kind = "grad" if name.startswith("d") else name
        assert_close(got[name], want[name], dtype, kind, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_forward(triton_device, case, dtype):
    check(run_both(case, dtype, triton_device), dtype)


@pytest.mark.parametrize("case", CASES)
def test_forward_with_padding_and_sub_tiles(triton_device, case):
    """The forward's one walk of a tile's list with left padding (blocks cut by the padding start, masked behind the
    branch) and with sub-tiles smaller than the blocks."""
    check(run_both(case, torch.float32, triton_device, **_hooks("padding", case, triton_device)), torch.float32)
    with kernel_options(interpreter_tiles=(16, 16)):
        check(run_both(case, torch.bfloat16, triton_device), torch.bfloat16)


def _triton_bwd():
    return importlib.import_module(bs.__name__ + ".triton_bwd")


def test_backward_plan_follows_head_dim(triton_device):  # the fixture first: triton_fwd reads TRITON_INTERPRET once
    """The measured per-shape choices: from head_dim 128 up two dK/dV loops, a walk per head and tiles first; below,
    one loop, one walk over a GQA group's shared list and heads first.  Lists per q head (or MHA) walk per head."""
    plan = _triton_bwd().backward_plan
    assert tuple(plan(64, 4, 4)) == (False, True, False)  # lists per KV head
    assert tuple(plan(64, 4, 8)) == (False, True, False)  # one list for all heads
    assert tuple(plan(128, 4, 4)) == (True, False, True)
    assert tuple(plan(256, 4, 8)) == (True, False, True)
    assert not plan(64, 4, 1).flat_group and not plan(64, 1, 1).flat_group  # lists per q head / MHA


# GQA with lists shared per KV head or by all heads, at a narrow and a wide head_dim: the two backward plans.
PLAN_CASES = [pytest.param(c.with_(D=d), id=f"{c}-D{d}") for c in
              (Case(B=2, Hq=4, Hkv=2, Tq=50, Tk=70, block_q=16, block_k=32, list_heads="kv"),
               Case(B=2, Hq=4, Hkv=1, Tq=40, Tk=40, list_heads="1", list_batch=False))
              for d in (32, 128)]


@pytest.mark.parametrize("case", PLAN_CASES)
@pytest.mark.parametrize("hook", ["padding", "biasq", "all"])
def test_backward_plans(triton_device, case, hook):
    """The backward under both head_dim plans (one loop and a flat group walk / two loops and a walk per head) with
    left padding (the masked prefix holds padded tiles as well as the diagonal), per-q-head bias and every hook
    together (the flat walk's per-head offsets); gain_tokens (delta from its own kernel) included in "all"."""
    plan = _triton_bwd().backward_plan(case.D, case.Hq // case.Hkv, case.Hq // {"kv": case.Hkv, "1": 1}[case.list_heads])
    assert plan.two_loop_dkdv == (case.D >= 128) and plan.flat_group == (case.D < 128)
    check(run_both(case, torch.float32, triton_device, grad=True, **_hooks(hook, case, triton_device)), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_backward(triton_device, case, dtype):
    check(run_both(case, dtype, triton_device, grad=True), dtype)


@pytest.mark.parametrize("shape,density,width", [((1, 2, 3, 40), 0.3, None), ((2, 1, 5, 1500), 0.05, None),
                                                  ((1, 3, 4, 70), 0.5, 70), ((1, 1, 6, 33), 0.0, 4),
                                                  ((2, 2, 3, 2100), 0.9, None),
                                                  pytest.param((2, 8, 128, 2048), 0.05, None, marks=pytest.mark.gpu)])
def test_mask_to_lists_kernel_matches_the_sorting_path(triton_device, shape, density, width):
    """Block mask -> ascending lists by a prefix sum per row (Triton) equals the torch path's sort, padding zeros
    included; rows longer than one 1024-column chunk and empty rows."""
    gen = torch.Generator().manual_seed(shape[-1])
    mask = torch.rand(shape, generator=gen) < density
    mask[..., 0, :] = False  # an empty row
    want = bs.blocks_from_mask(mask, width=width, backend="torch")
    got = bs.blocks_from_mask(mask.to(triton_device), width=width, backend="triton")
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a.cpu(), b)


def test_transposed_lists_are_reused_only_while_unchanged(triton_device):
    """The backward's transposed lists are built once per live list tensor and rebuilt after an in-place edit or for
    a new tensor; the rebuilt CSR matches a fresh build."""
    triton_bwd = importlib.import_module(bs.__name__ + ".triton_bwd")
    case = Case(B=2, Hq=4, Hkv=2, Tq=50, Tk=70, block_q=16, block_k=32, list_heads="kv")
    idx, cnt = random_blocks(case, "cpu", torch.Generator().manual_seed(5))
    opts = bs.Options(16, 32, True, case.D ** -0.5, None)
    first = triton_bwd.cached_transpose_lists(idx, cnt, 50, 70, opts)
    assert triton_bwd.cached_transpose_lists(idx, cnt, 50, 70, opts) is first
    assert triton_bwd.cached_transpose_lists(idx, cnt.clone(), 50, 70, opts) is not first
    cnt.zero_()  # an in-place edit bumps the version: the lists are rebuilt, now empty
    q_ids, offsets = triton_bwd.cached_transpose_lists(idx, cnt, 50, 70, opts)
    assert int(offsets.max()) == 0  # every segment empty (dropped entries sort past the last segment)
    fresh = triton_bwd.transpose_lists(idx, cnt, 50, 70, opts)
    assert all(torch.equal(a, b) for a, b in zip((q_ids, offsets), fresh))


HOOK_CASE = Case(B=2, Hq=4, Hkv=2, Tq=40, Tk=72, block_q=16, block_k=16, list_heads="q")


def _hooks(name, case, device):
    gen = torch.Generator().manual_seed(7)
    if name == "padding":
        start, end = padding_bounds(case, device, gen)
        return dict(kv_start=start, kv_end=end)
    if name.startswith("bias"):
        heads = {"bias1": 1, "biaskv": case.Hkv, "biasq": case.Hq}[name]
        return dict(col_bias=torch.randn(case.B, heads, case.Tk, generator=gen).to(device))
    if name == "softcap":
        return dict(softcap=2.5)
    if name == "gain_tokens":
        return dict(head_gain=torch.randn(case.B, case.Tq, case.Hq, generator=gen).to(device))
    if name == "gain_heads":
        return dict(head_gain=torch.rand(1, case.Hq, generator=gen).to(device))
    if name == "active":
        return dict(active=(torch.rand(case.B, case.Tq, case.Hq, generator=gen) < 0.4).to(device))
    if name == "all":
        out = {}
        for part in ("padding", "biasq", "softcap", "gain_tokens", "active"):
            out.update(_hooks(part, case, device))
        return out
    raise KeyError(name)


HOOKS = ["padding", "bias1", "biaskv", "biasq", "softcap", "gain_tokens", "gain_heads", "active"]


@pytest.mark.parametrize("hook", HOOKS)
def test_forward_hooks(triton_device, hook):
    dtype = torch.float32
    check(run_both(HOOK_CASE, dtype, triton_device, **_hooks(hook, HOOK_CASE, triton_device)),
          dtype)


@pytest.mark.parametrize("case", [pytest.param(HOOK_CASE, id="small"), pytest.param(
    LARGE[0], id="large", marks=pytest.mark.gpu)])
def test_backward_all_hooks(triton_device, case):
    dtype = torch.float32
    check(run_both(case, dtype, triton_device, grad=True, **_hooks("all", case, triton_device)),
          dtype)


def test_active_rows_are_exactly_zero(triton_device):
    hooks = _hooks("active", HOOK_CASE, triton_device)
    (got, _) = run_both(HOOK_CASE, torch.float16, triton_device, **hooks)
    inactive = ~hooks["active"].transpose(1, 2)
    assert (got["out"][inactive] == 0).all()
    assert torch.isneginf(got["lse"][inactive]).all()


@pytest.mark.parametrize("head_dim", [32, 128])
def test_sub_tiles(triton_device, head_dim):
    """Kernel tiles smaller than the logical blocks (as the autotuner may pick on a GPU), the forward's other launch
    order, both backward plans."""
    case = Case(B=1, Hq=2, Hkv=1, Tq=70, Tk=100, D=head_dim, block_q=32, block_k=64, list_heads="kv")
    with kernel_options(interpreter_tiles=(16, 16), interpreter_tiles_fastest=True):
        check(run_both(case, torch.float32, triton_device, grad=True,
                       **_hooks("padding", case, triton_device)), torch.float32)


DECODE = [
    pytest.param(Case(B=2, Hq=4, Hkv=2, Tq=1, Tk=300, block_q=16, block_k=32, list_heads="kv",
                      density=0.3), id="gqa-shared"),
    pytest.param(Case(B=2, Hq=4, Hkv=2, Tq=3, Tk=150, block_q=16, block_k=16, list_heads="q",
                      density=0.4), id="per-head-3q"),
    pytest.param(Case(B=1, Hq=4, Hkv=1, Tq=1, Tk=200, block_q=16, block_k=16, list_heads="1",
                      causal=False), id="mqa-noncausal"),
    pytest.param(Case(B=8, Hq=32, Hkv=8, Tq=1, Tk=32768, D=128, block_q=64, block_k=64,
                      list_heads="kv", density=0.05), id="large-b8", marks=pytest.mark.gpu),
    pytest.param(Case(B=1, Hq=32, Hkv=8, Tq=4, Tk=20000, D=64, block_q=64, block_k=128,
                      list_heads="q", density=0.1), id="large-4q", marks=pytest.mark.gpu),
]



def test_merge_walk_takes_the_fewest_load_rounds(triton_device):
    """A GQA group's 4 rows x 17 splits at batch 1 merge together in one round; one row per group (per-head lists)
    too (the same tile as the row walk); many rows with few splits walk the splits; head_dim 256 keeps the walks
    verified there."""
    decode = _decode_module()
    assert decode.merge_walk(4, 17, 128) == "together" and decode.together_tile(4, 17, 128) == (4, 32)
    assert decode.merge_walk(1, 33, 128) == "together"
    assert decode.merge_walk(4, 17, 256) == "rows"
    assert decode.merge_walk(256, 3, 128) == "splits"


@pytest.mark.parametrize("block_k", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("block_d", [64, 128, 256])
def test_decode_configs_divide_the_key_blocks(triton_device, block_k, block_d):
    """Every decode config left for a block size walks sub-tiles that divide it (a 64-key sub-tile on 16-key
    blocks walked nothing and returned zeros on the GPU; the interpreter does not autotune, so only this catches
    it on a CPU)."""
    decode = _decode_module()
    kept = decode.prune_decode_configs(decode._decode_tuned.configs, None, BK=block_k, BLOCK_D=block_d)
    assert kept and all(block_k % c.kwargs["BLOCK_N"] == 0 for c in kept)


def test_backward_configs_for_fp32_at_head_dim_256_fit_shared_memory(triton_device):
    """fp32 inputs at head_dim 256 keep only the backward tiles whose shared-memory plan fits (every larger one
    overflows after a long compile); 2-byte inputs and smaller head dims keep their configs."""
    triton_bwd = importlib.import_module(bs.__name__ + ".triton_bwd")
    for tuned in (triton_bwd._dq_tuned, triton_bwd._dkdv_tuned):
        def kept(precision, d):
            return triton_bwd._prune(tuned.configs, None, BQ=64, BK=64, BLOCK_D=d, DOT_PRECISION=precision)

        wide_fp32 = kept("ieee", 256)
        assert wide_fp32 and all(triton_bwd._smem_estimate(c, 256, 4) <= triton_bwd.FP32_WIDE_SMEM
                                 for c in wide_fp32)
        assert len(wide_fp32) < len(kept("tf32", 256))
        assert kept("ieee", 128) == kept("tf32", 128)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DECODE)
def test_decode(triton_device, case, dtype):
    check(run_both(case, dtype, triton_device), dtype)


@pytest.mark.parametrize("case", DECODE[:2])
def test_decode_hooks(triton_device, case):
    hooks = _hooks("all", case, triton_device)
    check(run_both(case, torch.float32, triton_device, **hooks), torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_full_block_set_uses_dense_path(triton_device, causal, monkeypatch):
    """The full block set is computed by SDPA; the kernel must agree with it as well."""
    case = Case(B=1, Hq=4, Hkv=2, Tq=64, Tk=64, causal=causal)
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(case, torch.float32, triton_device, gen)
    blocks = bs.causal_blocks if causal else bs.dense_blocks
    idx, cnt = blocks(64, 64, 16, 16, triton_device)
    kw = dict(block_q=16, block_k=16, causal=causal)
    monkeypatch.setattr(bs, "DENSE_CHECK_MIN_WORK", 0)
    assert bs._use_dense_fallback(q, k, idx, cnt, bs.Options(16, 16, causal, 0.25, None),
                                  None, None, None, None, False)
    dense = bs.block_sparse_attention(q, k, v, idx, cnt, backend="triton", **kw)
    with kernel_options(dense_fallback=False) as no_fallback:
        assert not bs._use_dense_fallback(q, k, idx, cnt, bs.Options(16, 16, causal, 0.25, None, no_fallback),
                                          None, None, None, None, False)
    kernel = bs.block_sparse_attention(q, k, v, idx, cnt, backend="triton", options=no_fallback, **kw)
    want = bs.block_sparse_attention(q, k, v, idx, cnt, backend="torch", **kw)
    assert_close(dense, want, torch.float32, "out", "sdpa")
    assert_close(kernel, want, torch.float32, "out", "kernel")
    sparse = idx.clone()
    sparse_cnt = (cnt - 1).clamp_min(0)
    assert not bs._use_dense_fallback(q, k, sparse, sparse_cnt,
                                      bs.Options(16, 16, causal, 0.25, None),
                                      None, None, None, None, False)


@pytest.mark.parametrize("causal", [True, False])
def test_lists_made_full_are_known_full_without_a_check(causal):
    """causal_blocks / dense_blocks mark their lists full, so even a call too small for the (host-syncing) full-set
    check goes to SDPA; an equal copy is not known (and too small to check), and an in-place edit forgets it."""
    q = torch.zeros(1, 2, 64, 16)
    k = torch.zeros(1, 1, 64, 16)
    opts = bs.Options(16, 16, causal, 0.25, None)
    idx, cnt = (bs.causal_blocks if causal else bs.dense_blocks)(64, 64, 16, 16)
    assert q.numel() * 64 < bs.DENSE_CHECK_MIN_WORK  # the check itself would be skipped here

    def dense_path(i, c, o=opts):
        return bs._use_dense_fallback(q, k, i, c, o, None, None, None, None, False)

    assert dense_path(idx, cnt)
    assert not dense_path(idx.clone(), cnt.clone())
    if causal:  # the causal set is not the full non-causal set
        assert not dense_path(idx, cnt, bs.Options(16, 16, False, 0.25, None))
    else:  # every block is full under the causal rule too
        assert dense_path(idx, cnt, bs.Options(16, 16, True, 0.25, None))
    cnt[..., -1] -= 1
    assert not dense_path(idx, cnt)


def test_list_memo_keeps_answers_per_key_and_forgets_on_edit():
    from patchattn.kernels.blocksparse._memo import ListMemo
    memo = ListMemo()
    idx, cnt = torch.zeros(1, 1, 2, 3, dtype=torch.int32), torch.ones(1, 1, 2, dtype=torch.int32)
    calls = []
    assert memo.get(idx, cnt, ("a",), lambda: calls.append(1) or 1) == 1
    assert memo.get(idx, cnt, ("b",), lambda: calls.append(2) or 2) == 2
    assert memo.get(idx, cnt, ("a",), lambda: calls.append(3) or 3) == 1 and calls == [1, 2]
    assert memo.peek(idx, cnt, ("b",)) == 2 and memo.peek(idx, cnt, ("c",)) is None
    assert memo.peek(idx.clone(), cnt, ("a",)) is None  # another indices tensor
    idx.add_(0)  # an in-place edit (version bump) forgets every answer
    assert memo.peek(idx, cnt, ("a",)) is None and memo.peek(idx, cnt, ("b",)) is None


# --- Decode's split-K merge, fused into the split kernel: its last program merges ----------------
MERGE_CASES = [  # enough listed blocks for more splits than the merge's MERGE_TILE (16)
    pytest.param(Case(B=2, Hq=4, Hkv=2, Tq=1, Tk=400, block_q=16, block_k=16, list_heads="kv",
                      density=0.7), id="gqa-shared"),
    pytest.param(Case(B=2, Hq=2, Hkv=1, Tq=3, Tk=300, block_q=16, block_k=16, list_heads="q",
                      density=0.9), id="per-head-3q"),
]


def _decode_module():
    return importlib.import_module(bs.__name__ + ".decode")


@contextlib.contextmanager
def _forced_splits(monkeypatch, decode, many):
    """Within the block, one split per row group, or one per list entry (many programs per row group, through
    ``KernelOptions.decode_programs_per_sm``); yields the numbers of splits chosen, for the test to check."""
    seen = []
    real = decode.choose_splits
    if not many:
        monkeypatch.setattr(decode, "ENTRIES_PER_PROGRAM", 1 << 30)
    monkeypatch.setattr(decode, "choose_splits", lambda *a: seen.append(real(*a)) or seen[-1])
    with kernel_options(decode_programs_per_sm=1 << 12 if many else 0):
        yield seen


def test_decode_splits_cap_the_stretch_one_program_walks(triton_device, monkeypatch):
    """Enough splits that no program walks more than ENTRIES_PER_PROGRAM entries of the widest list; the
    programs-per-SM rule decides below that (H200: 132 SMs), unless an option sets it."""
    decode = _decode_module()
    monkeypatch.setattr(decode, "_SM_COUNT", {torch.device("cuda"): 132})
    cuda = torch.device("cuda")
    assert decode.choose_splits(8, 51, cuda, heads=4) == 17  # the kernel benchmark's batch-1 point: unchanged
    assert decode.choose_splits(256, 27, cuda) == 1  # batch 8, top-k lists: one split per row group, unchanged
    assert decode.choose_splits(256, 2048, cuda) == 2048 // decode.ENTRIES_PER_PROGRAM  # cache-wide lists
    assert decode.choose_splits(32, 2048, cuda) == 2048 // decode.ENTRIES_PER_PROGRAM
    assert decode.choose_splits(4, 3, cuda) == 3  # never more splits than entries
    assert decode.choose_splits(8, 51, cuda, heads=4, programs_per_sm=2) == 33  # KernelOptions.decode_programs_per_sm


def test_decode_lists_of_very_different_lengths(triton_device, monkeypatch):
    """Per-head lists as long as the cache beside short ones (duo's full and streaming heads), split so no program
    walks more than ENTRIES_PER_PROGRAM entries: every head against the reference, GQA, batch 2."""
    decode = _decode_module()
    monkeypatch.setattr(decode, "ENTRIES_PER_PROGRAM", 8)
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, D, block, n_k = 2, 4, 2, 32, 16, 40
    q = torch.randn(B, Hq, 1, D, generator=gen).to(triton_device)
    k, v = (torch.randn(B, Hkv, n_k * block, D, generator=gen).to(triton_device) for _ in range(2))
    idx = torch.zeros(B, Hq, 1, n_k, dtype=torch.int32)
    cnt = torch.zeros(B, Hq, 1, dtype=torch.int32)
    for b in range(B):
        for h, count in enumerate([n_k, 3, n_k - 1, 5]):
            idx[b, h, 0, :count] = torch.arange(n_k - count, n_k, dtype=torch.int32)
            cnt[b, h, 0] = count
    idx, cnt = idx.to(triton_device), cnt.to(triton_device)
    got = bs.block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=block, backend="triton")
    want = bs.block_sparse_attention(q.double(), k.double(), v.double(), idx, cnt, block_q=16, block_k=block,
                                     backend="torch")
    assert decode.choose_splits(B * Hq, n_k, q.device) >= n_k // 8
    assert float((got.double() - want).abs().max()) <= 1e-4


def _merge_hooks(name, case, device):
    """Hooks the merge applies (gain, active) plus padding; no bias, so GQA groups stay shared."""
    if name == "none":
        return {}
    return {**_hooks("padding", case, device), **_hooks("gain_tokens", case, device),
            **_hooks("active", case, device)}


def _decode(q, k, v, idx, cnt, case, backend, return_lse, **hooks):
    """(out, lse or None) of one decode call."""
    res = bs.block_sparse_attention(q, k, v, idx, cnt, block_q=case.block_q, block_k=case.block_k,
                                    causal=case.causal, return_lse=return_lse, backend=backend,
                                    **hooks)
    return res if return_lse else (res, None)


def _check_decode(q, k, v, idx, cnt, case, dtype, return_lse, **hooks):
    got = _decode(q, k, v, idx, cnt, case, "triton", return_lse, **hooks)
    want = _decode(q, k, v, idx, cnt, case, "torch", return_lse, **hooks)
    assert_close(got[0], want[0], dtype, "out", "out")
    if return_lse:
        assert_close(got[1], want[1], dtype, "lse", "lse")


def _alloc_module():
    return importlib.import_module(bs.__name__ + "._alloc")


def _merge_counters(device):
    return _alloc_module()._COUNTERS[(torch.device(device), "decode_merge")]


def _counters_are_zero(decode, device):
    """Every cached merge-counter buffer of the device is 0."""
    bufs = _merge_counters(device)
    return len(bufs) > 0 and all(int(b.abs().sum()) == 0 for b in bufs)


@pytest.mark.parametrize("need_lse", [True, False], ids=["lse", "no-lse"])
@pytest.mark.parametrize("hooks", ["none", "gain-active"])
@pytest.mark.parametrize("splits", ["one", "many"])
@pytest.mark.parametrize("walk", ["rows", "splits", "together"])
@pytest.mark.parametrize("case", MERGE_CASES)
def test_decode_merge(triton_device, monkeypatch, case, walk, splits, hooks, need_lse):
    """Every merge walk against the reference: one split (the kernel writes the output directly) and more splits
    than MERGE_TILE (the last program merges, walking rows -- several load rounds of ROW_MERGE_TILE splits --,
    splits, or all rows together -- several rounds of a few splits, a padded row when 3 queries share a head),
    with the gain/active hooks the merge applies, with and without lse.  The walk ``merge_walk`` would pick at
    other shapes is taken here at this one."""
    if walk != "rows" and splits == "one":
        pytest.skip("one split does not merge")
    decode = _decode_module()
    monkeypatch.setattr(decode, "merge_walk", lambda *_shape: walk)
    monkeypatch.setattr(decode, "ROW_MERGE_TILE", 4)
    monkeypatch.setattr(decode, "TOGETHER_ELEMENTS", 1024)  # 4 rows x 4 splits x 64 dims: several rounds
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(case, torch.float32, triton_device, gen)
    idx, cnt = random_blocks(case, triton_device, gen)
    with _forced_splits(monkeypatch, decode, splits == "many") as seen:
        _check_decode(q, k, v, idx, cnt, case, torch.float32, need_lse,
                      **_merge_hooks(hooks, case, triton_device))
    n_splits = seen[-1]
    assert n_splits == 1 if splits == "one" else n_splits > decode.MERGE_TILE
    assert _counters_are_zero(decode, q.device)


@pytest.mark.parametrize("case", MERGE_CASES)
def test_decode_fused_counters_reset(triton_device, monkeypatch, case):
    """Consecutive fused calls share the cached counters: the last program of each row group must
    leave its counter at 0, or the next call never merges (its output would stay NaN-poisoned).
    A larger call grows the cache and keeps the old buffer (a captured graph may still use it)."""
    decode = _decode_module()
    monkeypatch.setattr(_alloc_module(), "_COUNTERS", {})
    monkeypatch.setattr(_alloc_module(), "_MIN_COUNTERS", 1)
    gen = torch.Generator().manual_seed(5)
    small = case.with_(B=1)
    with _forced_splits(monkeypatch, decode, many=True):
        for step, c in enumerate([small, small, case]):
            q, k, v = make_qkv(c, torch.bfloat16, triton_device, gen)
            idx, cnt = random_blocks(c, triton_device, gen)
            _check_decode(q, k, v, idx, cnt, c, torch.bfloat16, step != 1)
            assert _counters_are_zero(decode, q.device), f"call {step} left counters set"
    assert len(_merge_counters(q.device)) == 2  # grown once, the old one kept


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4])
def test_decode_cuda_graph_replays(triton_device, B):
    """A decode call captured in a CUDA graph and replayed with new queries copied in: each replay
    matches the reference, which needs the fused kernel's counters reset by its last programs."""
    decode = _decode_module()
    case = Case(B=B, Hq=32, Hkv=8, Tq=1, Tk=32768, D=128, block_q=64, block_k=64,
                list_heads="kv", density=0.05)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(B)
    q, k, v = make_qkv(case, dtype, triton_device, gen)
    idx, cnt = random_blocks(case, triton_device, gen)
    static_q = q.clone()

    def call():
        return _decode(static_q, k, v, idx, cnt, case, "triton", True)

    call()  # compile, tune and fill the counter cache outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = call()
    for _ in range(2):
        static_q.copy_(torch.randn(q.shape, generator=gen).to(triton_device, dtype))
        graph.replay()
        torch.cuda.synchronize()
        want_out, want_lse = _decode(static_q, k, v, idx, cnt, case, "torch", True)
        assert_close(out, want_out, dtype, "out", "out")
        assert_close(lse, want_lse, dtype, "lse", "lse")
        assert _counters_are_zero(decode, q.device)


@pytest.mark.gpu
def test_decode_first_called_inside_compiled_cuda_graphs(triton_device, monkeypatch):
    """The decode kernel's first call in the process inside torch.compile's CUDA graphs ("reduce-overhead", what
    transformers' compiled static-cache decode uses): its lasting buffers (merge counters, the spare pointer) are
    made during the graphs' un-captured warm-up run, and must not land in the graphs' private pool, which refuses
    tensors no graph outputs ("Detected 2 tensor(s) in the cudagraph pool not tracked as outputs")."""
    monkeypatch.setattr(_alloc_module(), "_COUNTERS", {})
    monkeypatch.setattr(_alloc_module(), "_SPARE", {})
    case = Case(B=1, Hq=8, Hkv=2, Tq=1, Tk=4096, D=64, block_q=64, block_k=64, list_heads="kv", density=0.1)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(case, dtype, triton_device, gen)
    idx, cnt = random_blocks(case, triton_device, gen)
    torch._dynamo.reset()
    step = torch.compile(lambda x: _decode(x, k, v, idx, cnt, case, "triton", False)[0], mode="reduce-overhead")
    for _ in range(4):  # warm-up, recording, replays
        x = torch.randn(q.shape, generator=gen).to(triton_device, dtype)
        got = step(x).clone()
        assert_close(got, _decode(x, k, v, idx, cnt, case, "torch", False)[0], dtype, "out", "out")


@pytest.mark.gpu
def test_decode_fused_merge_under_load(triton_device):
    """Memory ordering on the device: many concurrent splits per row group, calls alternating two
    queries.  A last program that read a partial before it was visible would see the NaN poison or
    the other query's values; the merge order is fixed, so repeats must also be bitwise equal."""
    decode = _decode_module()
    case = Case(B=1, Hq=32, Hkv=8, Tq=1, Tk=65536, D=128, block_q=64, block_k=64,
                list_heads="kv", density=0.05)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(case, dtype, triton_device, gen)
    q2 = torch.randn(q.shape, generator=gen).to(triton_device, dtype)
    idx, cnt = random_blocks(case, triton_device, gen)
    firsts = []
    with kernel_options(decode_programs_per_sm=4):
        for qq in (q, q2):
            got = _decode(qq, k, v, idx, cnt, case, "triton", True)
            want = _decode(qq, k, v, idx, cnt, case, "torch", True)
            assert_close(got[0], want[0], dtype, "out", "out")
            assert_close(got[1], want[1], dtype, "lse", "lse")
            firsts.append(got)
        for i in range(200):
            out, lse = _decode((q, q2)[i % 2], k, v, idx, cnt, case, "triton", True)
            assert torch.equal(out, firsts[i % 2][0]) and torch.equal(lse, firsts[i % 2][1]), i
    assert _counters_are_zero(decode, q.device)


def test_programmatic_dependent_launch_only_when_compiled_for_hopper(monkeypatch):
    """Decode-step kernels ask for programmatic dependent launch (a launch option plus the PDL constexpr that makes
    them wait on the device first) only on a CUDA device of sm_90+ with the option on, never under the interpreter."""
    triton_fwd = importlib.import_module(bs.__name__ + ".triton_fwd")
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(triton_fwd, "INTERPRETING", False)
    monkeypatch.setitem(triton_fwd._HOPPER_OR_NEWER, cuda, True)  # as if sm_90
    assert triton_fwd.pdl_options(cuda, True) == {"PDL": True, "launch_pdl": True}
    assert triton_fwd.pdl_options(torch.device("cpu"), True) == {"PDL": False}
    assert triton_fwd.pdl_options(cuda, False) == {"PDL": False}  # KernelOptions(pdl=False)
    monkeypatch.setitem(triton_fwd._HOPPER_OR_NEWER, cuda, False)  # as if an older GPU
    assert triton_fwd.pdl_options(cuda, True) == {"PDL": False}
    monkeypatch.setitem(triton_fwd._HOPPER_OR_NEWER, cuda, True)
    monkeypatch.setattr(triton_fwd, "INTERPRETING", True)
    assert triton_fwd.pdl_options(cuda, True) == {"PDL": False}


def test_kernel_options_are_scoped_and_explicit_options_win():
    """``kernel_options`` changes the options of calls without ``options=`` inside its block only (nested blocks
    stack); an explicit ``options=`` is used as given; unknown names and non-options are refused."""
    from blocksparse_cases import KernelOptions, kernels

    outside = kernels.current_options()
    with kernel_options(dense_fallback=False) as inner:
        assert kernels.current_options() is inner and not inner.dense_fallback
        assert inner.poison_outputs == outside.poison_outputs  # the rest carried over
        with kernel_options(pdl=False):
            assert not kernels.current_options().pdl and not kernels.current_options().dense_fallback
        assert kernels.current_options().pdl
    assert kernels.current_options() == outside
    mine = KernelOptions(tree_warps=8)
    assert kernels.options.resolve_options(mine) is mine and kernels.options.resolve_options(None) is outside
    with pytest.raises(TypeError):
        kernels.options.resolve_options({"pdl": False})
    with pytest.raises(TypeError), kernel_options(no_such_option=1):
        pass
    with pytest.raises(dataclasses.FrozenInstanceError):
        mine.pdl = False  # type: ignore[misc]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lists_counting_from_each_rows_start_equal_each_row_alone(backend, dtype, request):
    """``lists_from_start``: a static cache's decode step in one launch, rows with their real keys at different
    offsets and empty slots after them, equals each row's keys sliced out and attended alone."""
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, Tk, D, bk = 3, 4, 2, 150, 32, 16
    q = torch.randn(B, Hq, 1, D, generator=gen).to(device, dtype)
    k, v = (torch.randn(B, Hkv, Tk, D, generator=gen).to(device, dtype) for _ in range(2))
    starts = torch.tensor([0, 7, 40], dtype=torch.int32, device=device)
    ends = torch.tensor([150, 91, 43], dtype=torch.int32, device=device)  # row 0 full, rows 1-2 end early
    width = 4
    idx = torch.zeros(B, Hkv, 1, width, dtype=torch.int32)
    cnt = torch.zeros(B, Hkv, 1, dtype=torch.int32)
    for b in range(B):
        n_k = -(-int(ends[b] - starts[b]) // bk)
        for h in range(Hkv):
            pick = torch.randperm(n_k - 1, generator=gen)[: min(width - 1, n_k - 1)].sort().values
            row = torch.cat([pick, torch.tensor([n_k - 1])]).to(torch.int32)  # always the newest block
            idx[b, h, 0, : len(row)], cnt[b, h, 0] = row, len(row)
    idx, cnt = idx.to(device), cnt.to(device)
    got = bs.block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=bk, kv_start=starts, kv_end=ends,
                                    lists_from_start=True, backend=backend)
    for b in range(B):
        lo, hi = int(starts[b]), int(ends[b])
        alone = bs.block_sparse_attention(q[b:b + 1], k[b:b + 1, :, lo:hi], v[b:b + 1, :, lo:hi], idx[b:b + 1],
                                          cnt[b:b + 1], block_q=16, block_k=bk, backend="torch")
        assert_close(got[b:b + 1], alone, dtype, "out", f"row {b}")


def test_lists_from_start_needs_bounds_and_one_query_block():
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 64, 16)
    idx, cnt = torch.zeros(1, 2, 1, 1, dtype=torch.int32), torch.ones(1, 2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_start and kv_end"):
        bs.block_sparse_attention(q, k, k, idx, cnt, block_q=16, block_k=16, lists_from_start=True, backend="torch")


def test_decode_compiles_whole_as_one_operator(triton_device):
    """Under torch.compile the Triton decode launch is one opaque operator (``patchattn::block_sparse_decode``):
    fullgraph=True traces no launch code, and the compiled call equals the eager one."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 1, 32, generator=gen).to(triton_device)
    k, v = (torch.randn(2, 2, 100, 32, generator=gen).to(triton_device) for _ in range(2))
    idx = torch.tensor([[0, 2, 6], [1, 3, 0]], dtype=torch.int32, device=triton_device).view(2, 1, 1, 3)
    cnt = torch.tensor([3, 2], dtype=torch.int32, device=triton_device).view(2, 1, 1)
    starts = torch.tensor([0, 9], dtype=torch.int32, device=triton_device)
    ends = torch.tensor([100, 80], dtype=torch.int32, device=triton_device)

    def call(q, k, v):
        return bs.block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=16, kv_start=starts, kv_end=ends,
                                         lists_from_start=True, backend="triton")

    got = torch.compile(call, fullgraph=True, backend="eager")(q, k, v)
    assert_close(got, call(q, k, v), torch.float32, "out", "compiled")


def test_host_next_power_of_2_matches_triton():
    import triton

    from patchattn.kernels.blocksparse.decode import next_power_of_2
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
