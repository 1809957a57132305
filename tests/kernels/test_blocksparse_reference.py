"""The torch reference (CPU path and oracle) against a dense masked softmax in fp64, the block-list
helpers, and the entry point's argument checks. Pure torch: runs everywhere, fast."""
import math

import pytest
import torch
from blocksparse_cases import Case, assert_close, bs, make_qkv, padding_bounds, random_blocks

reference = bs.reference

CASES = [
    Case(),
    Case(B=2, Hq=4, Hkv=2, Tq=50, Tk=70, block_q=16, block_k=32, list_heads="kv"),
    Case(B=2, Hq=4, Hkv=1, Tq=33, Tk=33, block_q=8, block_k=16, list_heads="1", list_batch=False),
    Case(B=1, Hq=3, Hkv=3, Tq=40, Tk=40, causal=False, density=0.3),
    Case(B=2, Hq=6, Hkv=2, Tq=5, Tk=90, block_q=16, block_k=16, list_heads="q"),  # decode-like
]


def dense_oracle(case, q, k, v, idx, cnt, **hooks):
    allowed = reference.element_mask(idx, cnt, case.Tq, case.Tk, block_q=case.block_q,
                                     block_k=case.block_k, causal=case.causal, Hq=case.Hq,
                                     kv_start=hooks.get("kv_start"), kv_end=hooks.get("kv_end"))
    return reference.dense_attention_reference(q, k, v, allowed, scale=1 / math.sqrt(case.D),
                                               softcap=hooks.get("softcap"),
                                               col_bias=hooks.get("col_bias"))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("hooks", ["plain", "all"])
def test_reference_matches_dense_fp64(case, hooks):
    gen = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(case, torch.float64, "cpu", gen)
    idx, cnt = random_blocks(case, "cpu", gen)
    kw = {}
    if hooks == "all":
        start, end = padding_bounds(case, "cpu", gen)
        kw = dict(kv_start=start, kv_end=end, softcap=3.0,
                  col_bias=torch.randn(1, case.Hkv, case.Tk, generator=gen, dtype=torch.float64))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = bs.block_sparse_attention(q, k, v, idx, cnt, block_q=case.block_q,
                                         block_k=case.block_k, causal=case.causal,
                                         return_lse=True, backend="torch", **kw)
    exp_out, exp_lse = dense_oracle(case, q, k, v, idx, cnt, **kw)
    assert_close(out, exp_out, torch.float64, "out", "out")
    assert_close(lse, exp_lse, torch.float32, "lse", "lse")  # lse is returned in fp32
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(exp_out, (q, k, v), grad)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, torch.float64, "grad", f"d{name}")


def test_reference_hooks_gain_and_active():
    case = Case(B=2, Hq=4, Hkv=2, Tq=32, Tk=32)
    gen = torch.Generator().manual_seed(2)
    q, k, v = make_qkv(case, torch.float64, "cpu", gen)
    idx, cnt = random_blocks(case, "cpu", gen)
    gain = torch.randn(case.B, case.Tq, case.Hq, generator=gen, dtype=torch.float64)
    active = torch.rand(case.B, case.Tq, case.Hq, generator=gen) < 0.5
    out = bs.block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=16, head_gain=gain,
                                    active=active, backend="torch")
    base, _ = dense_oracle(case, q, k, v, idx, cnt)
    want = base * gain.transpose(1, 2)[..., None] * active.transpose(1, 2)[..., None]
    assert_close(out, want, torch.float64, "out", "out")
    assert (out.transpose(1, 2)[~active] == 0).all()


def test_reference_chunks_agree():
    """Chunking the query blocks must not change the result."""
    case = Case(B=1, Hq=4, Hkv=2, Tq=96, Tk=96, list_heads="kv")
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(case, torch.float64, "cpu", gen)
    idx, cnt = random_blocks(case, "cpu", gen)
    whole = bs.block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=16, backend="torch")
    old = reference.CHUNK_SCORE_ELEMENTS
    reference.CHUNK_SCORE_ELEMENTS = 1  # one query block per chunk
    try:
        chunked = bs.block_sparse_attention(q, k, v, idx, cnt, block_q=16, block_k=16,
                                            backend="torch")
    finally:
        reference.CHUNK_SCORE_ELEMENTS = old
    assert_close(chunked, whole, torch.float64, "out", "out")


def test_empty_rows_give_zero_and_minus_inf():
    q = torch.randn(1, 2, 32, 16)
    k = torch.randn(1, 2, 32, 16)
    idx = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    cnt = torch.zeros(1, 1, 2, dtype=torch.int32)
    out, lse = bs.block_sparse_attention(q, k, k, idx, cnt, block_q=16, block_k=16,
                                         return_lse=True, backend="torch")
    assert (out == 0).all() and torch.isneginf(lse).all()


# --- block-list helpers -------------------------------------------------------------------------
def test_blocks_mask_round_trip():
    mask = torch.rand(2, 3, 5, 7) < 0.4
    mask[0, 0, 0] = False
    idx, cnt = bs.blocks_from_mask(mask)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32
    assert torch.equal(bs.mask_from_blocks(idx, cnt, 7), mask)
    both_valid = (torch.arange(1, idx.shape[-1]) < cnt[..., None])
    assert (idx.diff(dim=-1)[both_valid] > 0).all()  # strictly ascending


def test_causal_blocks_and_density():
    idx, cnt = bs.causal_blocks(100, 260, 32, 64, "cpu")
    assert idx.shape == (1, 1, 4, 5)
    # query i sits at key i + 160: block 0 ends at key 191 -> blocks 0..2
    assert cnt.flatten().tolist() == [3, 4, 4, 5]
    assert bs.density(cnt, 100, 260, 32, 64, causal=True) == 1.0
    half = torch.div(cnt, 2, rounding_mode="floor")
    assert 0.4 < bs.density(half, 100, 260, 32, 64, causal=True) < 0.5
    _, dense_cnt = bs.dense_blocks(100, 260, 32, 64)
    assert bs.density(dense_cnt, 100, 260, 32, 64, causal=False) == 1.0


# --- argument checks ------------------------------------------------------------------------------
def _args(**over):
    q = torch.randn(1, 4, 32, 16)
    k = torch.randn(1, 2, 32, 16)
    idx, cnt = bs.causal_blocks(32, 32, 16, 16)
    args = dict(q=q, k=k, v=k.clone(), kv_indices=idx, kv_counts=cnt)
    args.update(over)
    return args


@pytest.mark.parametrize("over, name", [
    (dict(k=torch.randn(1, 3, 32, 16), v=torch.randn(1, 3, 32, 16)), "Hkv"),
    (dict(v=torch.randn(1, 2, 31, 16)), "v.shape"),
    (dict(q=torch.randn(1, 4, 32, 16, dtype=torch.float16)), "k.dtype"),
    (dict(kv_indices=torch.zeros(1, 1, 3, 2, dtype=torch.int32)), "kv_indices.shape[2]"),
    (dict(kv_indices=torch.zeros(1, 3, 2, 2, dtype=torch.int32)), "kv_indices.shape[1]"),
    (dict(kv_indices=torch.zeros(1, 1, 2, 2)), "kv_indices.dtype"),
    (dict(kv_counts=torch.zeros(1, 1, 3, dtype=torch.int32)), "kv_counts.shape"),
    (dict(col_bias=torch.randn(1, 3, 32)), "col_bias"),
    (dict(head_gain=torch.randn(1, 3)), "head_gain"),
    (dict(active=torch.ones(1, 32, 4)), "active"),
    (dict(kv_start=torch.zeros(2, dtype=torch.int32)), "kv_start"),
])
def test_bad_arguments_name_the_argument(over, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[").replace("]", r"\]")):
        bs.block_sparse_attention(**_args(**over), block_q=16, block_k=16, backend="torch")


def test_unknown_backend_lists_allowed():
    with pytest.raises(ValueError, match="auto, triton, torch"):
        bs.block_sparse_attention(**_args(), block_q=16, block_k=16, backend="cuda")


def test_triton_backend_without_cuda_says_so(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        bs.block_sparse_attention(**_args(), block_q=16, block_k=16, backend="triton")


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a = _args()
    out = bs.block_sparse_attention(**a, block_q=16, block_k=16)
    ref = bs.block_sparse_attention(**a, block_q=16, block_k=16, backend="torch")
    assert torch.equal(out, ref)
