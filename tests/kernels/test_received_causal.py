"""kernels/received, causal variant (``received_causal``, act's prefill column scores): the chunked torch path and
the two Triton passes (interpreter on CPU) against a brute-force float64 oracle on the materialised probabilities:
fp32 / bf16, odd lengths, Tq < Tk, GQA, left padding (``starts``, a fully padded sequence), ``ends``, rows whose
given lse is not finite (they see no key), 16 x 16 sub-tiles, and the validation errors."""

import pytest
import torch
from blocksparse_cases import kernel_options

from patchattn.kernels.received import received_causal

SCORE_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}  # relative to max |expected|
LSE_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}  # absolute, on finite entries


def brute_force(q, k, lse, *, scale, starts=None, ends=None):
    """(refined lse, scores) from the whole probability matrix in float64 (bf16 inputs are exact there)."""
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    q, k, lse = q.double(), k.double().repeat_interleave(Hq // k.shape[1], 1), lse.double()
    last = torch.full((B,), Tk) if ends is None else ends.long()
    pos = (last[:, None] - Tq + torch.arange(Tq)[None])[:, None, :, None]  # [B, 1, Tq, 1]
    keys = torch.arange(Tk)
    ok = keys <= pos
    if starts is not None:
        start = starts.long().view(-1, 1, 1, 1)
        ok = ok & (keys >= start) & (pos >= start)
    ok = ok & torch.isfinite(lse)[..., None]
    safe = torch.where(torch.isfinite(lse), lse, 0.0)[..., None]
    probs = torch.where(ok, torch.exp(q @ k.transpose(-1, -2) * scale - safe), 0.0)
    row = probs.sum(-1)
    refined = lse + torch.log(row)
    normalised = probs / torch.where(row > 0, row, 1.0)[..., None]
    seen_by = (Tk - keys).clamp(max=Tq).double()
    return refined, normalised.sum(2) / seen_by


def _case(batch=2, heads=4, kv_heads=2, q_len=37, kv_len=37, dim=32, dtype=torch.float32, seed=0, starts=None,
          ends=None, jitter=1e-3):
    """q, k and a given lse: the exact one (of the inputs as given) plus ``jitter`` (the engine's lse is fp32, so the
    renormalisation has something to correct)."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, heads, q_len, dim, generator=gen) * 2).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=gen).to(dtype)
    exact, _ = brute_force(q, k, torch.zeros(batch, heads, q_len), scale=dim ** -0.5, starts=starts, ends=ends)
    noise = torch.randn(batch, heads, q_len, generator=gen, dtype=torch.float64) * jitter
    return q, k, (exact + noise).float()


def _check(got, want, dtype):
    (lse, scores), (want_lse, want_scores) = got, want
    assert lse.shape == want_lse.shape and scores.shape == want_scores.shape
    assert torch.equal(torch.isfinite(lse), torch.isfinite(want_lse)), "rows that see no key differ"
    assert torch.isfinite(scores).all(), "NaN or Inf score"
    finite = torch.isfinite(want_lse)
    assert (lse.double()[finite] - want_lse[finite]).abs().max().item() <= LSE_TOL[dtype]
    err = (scores.double() - want_scores).abs().max().item() / want_scores.abs().max().item()
    assert err <= SCORE_TOL[dtype], f"{err:.3g} > {SCORE_TOL[dtype]:.3g}"


CASES = {  # (batch, heads, kv_heads, q_len, kv_len, starts, ends)
    "odd-gqa-padded": (2, 4, 2, 37, 37, [0, 9], None),
    "long-mqa": (1, 3, 1, 131, 131, None, None),
    "q-shorter": (2, 2, 2, 19, 70, [3, 0], None),
    "fully-padded-row": (2, 2, 1, 21, 21, [0, 21], None),
    "ends": (2, 2, 2, 30, 45, [0, 4], [45, 33]),
    "ends-prefill": (2, 2, 2, 40, 40, [2, 0], [40, 29]),
}


def _bounds(starts, ends):
    return (None if starts is None else torch.tensor(starts, dtype=torch.int32),
            None if ends is None else torch.tensor(ends, dtype=torch.int32))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_torch_path_matches_the_brute_force(name, dtype):
    batch, heads, kv_heads, q_len, kv_len, starts, ends = CASES[name]
    starts, ends = _bounds(starts, ends)
    q, k, lse = _case(batch, heads, kv_heads, q_len, kv_len, dtype=dtype, starts=starts, ends=ends)
    want = brute_force(q, k, lse, scale=0.2, starts=starts, ends=ends)
    got = received_causal(q, k, lse, scale=0.2, starts=starts, ends=ends, backend="torch", chunk_rows=16)
    _check(got, want, dtype)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", [None, (16, 16)], ids=["blocks", "tiles16"])
def test_triton_matches_the_brute_force(triton_target, name, dtype, tiles):
    batch, heads, kv_heads, q_len, kv_len, starts, ends = CASES[name]
    starts, ends = _bounds(starts, ends)
    q, k, lse = _case(batch, heads, kv_heads, q_len, kv_len, dtype=dtype, starts=starts, ends=ends)
    want = brute_force(q, k, lse, scale=0.2, starts=starts, ends=ends)
    dev = triton_target
    with kernel_options(interpreter_tiles=tiles):
        got = received_causal(q.to(dev), k.to(dev), lse.to(dev), scale=0.2, backend="triton",
                              starts=None if starts is None else starts.to(dev),
                              ends=None if ends is None else ends.to(dev))
    assert got[0].dtype == got[1].dtype == torch.float32
    _check(tuple(t.cpu() for t in got), want, dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rows_with_a_non_finite_lse_see_nothing_and_columns_false_skips_the_scores(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    q, k, lse = _case(1, 2, 2, 33, 33, dim=16)
    lse[0, 0, 5] = float("-inf")
    lse[0, 1, 20] = float("-inf")
    lse[0, 1, 9] = float("nan")
    want = brute_force(q, k, lse, scale=0.25)
    got = received_causal(q, k, lse, scale=0.25, backend=backend)
    _check(got, want, torch.float32)
    assert got[0][0, 0, 5] == float("-inf") and got[0][0, 1, 20] == float("-inf") and got[0][0, 1, 9].isnan()
    only_lse, none = received_causal(q, k, lse, scale=0.25, backend=backend, columns=False)
    assert none is None
    finite = torch.isfinite(got[0])
    assert torch.allclose(only_lse[finite], got[0][finite], rtol=0, atol=1e-6)


def test_validation_errors():
    q, k, lse = _case(1, 2, 2, 8, 8, dim=16)
    with pytest.raises(ValueError, match="lse must be"):
        received_causal(q, k, lse[..., :4], backend="torch")
    with pytest.raises(ValueError, match="starts must be"):
        received_causal(q, k, lse, starts=torch.tensor([0.0]), backend="torch")
    with pytest.raises(ValueError, match="ends must be"):
        received_causal(q, k, lse, ends=torch.tensor([8, 8]), backend="torch")
    with pytest.raises(ValueError, match="received_causal: query heads"):
        received_causal(q, k[:, :0], lse, backend="torch")
