"""kernels/lightning: the chunked torch path and the Triton forward (interpreter on CPU) against the naive O(T^2)
oracle ``((q k^T) * D) v`` and a token-by-token recurrence, forward and backward, fp32 / bf16, odd lengths, an
initial state (decode from state = one chunked pass), GQA-shaped heads."""

import pytest
import torch

from patchattn.kernels.lightning import (
    alibi_slopes,
    chunked_linear_attention,
    lightning_attention,
    naive_linear_attention,
    recurrent_step,
)


def _inputs(batch=2, heads=3, t=37, f=8, e=5, dtype=torch.float32, requires_grad=False):
    q, k = torch.rand(batch, heads, t, f), torch.rand(batch, heads, t, f)  # non-negative features, as phi gives
    v = torch.randn(batch, heads, t, e)
    out = [x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v)]
    return (*out, torch.tensor(alibi_slopes(heads)))


def _loop_oracle(q, k, v, slopes, state=None):
    """Independent oracle: the definition summed token by token in float64."""
    batch, heads, t, _ = q.shape
    out = torch.zeros(batch, heads, t, v.shape[-1], dtype=torch.float64)
    for h in range(heads):
        lam = torch.exp(-slopes[h].double())
        for i in range(t):
            for j in range(i + 1):
                out[:, h, i] += lam ** (i - j) * (q[:, h, i].double() * k[:, h, j].double()).sum(-1)[:, None] * \
                    v[:, h, j].double()
            if state is not None:
                out[:, h, i] += lam ** (i + 1) * (q[:, h, i].double()[:, None, :] @ state[:, h].double())[:, 0]
    return out


def test_alibi_slopes_are_the_geometric_sequence():
    assert alibi_slopes(8) == pytest.approx([2 ** -(i + 1) for i in range(8)])
    assert alibi_slopes(4) == pytest.approx([2 ** -(2 * (i + 1)) for i in range(4)])
    six = alibi_slopes(6)  # not a power of 2: the 4 of 4 heads, then every other of 8
    assert six[:4] == pytest.approx(alibi_slopes(4)) and six[4:] == pytest.approx(alibi_slopes(8)[0::2][:2])


@pytest.mark.parametrize("t", [1, 15, 37])
def test_naive_reference_matches_the_definition(t):
    q, k, v, slopes = _inputs(t=t)
    state = torch.randn(2, 3, 8, 5)
    out, _ = naive_linear_attention(q, k, v, slopes, state)
    assert torch.allclose(out.double(), _loop_oracle(q, k, v, slopes, state), atol=1e-4)


@pytest.mark.parametrize("t,block", [(1, 16), (16, 16), (37, 16), (70, 32)])
def test_chunked_and_recurrent_paths_match_the_naive_oracle(t, block):
    q, k, v, slopes = _inputs(t=t)
    for state in (None, torch.randn(2, 3, 8, 5)):
        want, want_state = naive_linear_attention(q, k, v, slopes, state)
        out, final = chunked_linear_attention(q, k, v, slopes, state, block=block)
        assert torch.allclose(out, want, atol=1e-4) and torch.allclose(final, want_state, atol=1e-4)
        start = state if state is not None else torch.zeros(2, 3, 8, 5)
        out, final = recurrent_step(q, k, v, slopes, start)
        assert torch.allclose(out, want, atol=1e-4) and torch.allclose(final, want_state, atol=1e-4)


def test_decay_matters_and_no_decay_is_plain_causal_linear_attention():
    q, k, v, slopes = _inputs(t=20)
    plain, _ = naive_linear_attention(q, k, v, torch.zeros(3))
    want = torch.tril(q @ k.transpose(-1, -2)) @ v
    assert torch.allclose(plain, want, atol=1e-4)
    decayed, _ = naive_linear_attention(q, k, v, slopes)
    assert (decayed - plain).abs().max() > 1e-2


def test_prefill_in_two_pieces_through_the_state_equals_one_pass():
    q, k, v, slopes = _inputs(t=41)
    whole, whole_state = chunked_linear_attention(q, k, v, slopes, block=16)
    first, state = chunked_linear_attention(q[:, :, :30], k[:, :, :30], v[:, :, :30], slopes, block=16)
    rest, final = recurrent_step(q[:, :, 30:], k[:, :, 30:], v[:, :, 30:], slopes, state)
    assert torch.allclose(torch.cat([first, rest], 2), whole, atol=1e-5)
    assert torch.allclose(final, whole_state, atol=1e-5)


def test_chunked_gradients_match_the_naive_oracle():
    q, k, v, slopes = _inputs(t=29, requires_grad=True)
    state = torch.randn(2, 3, 8, 5, requires_grad=True)
    grad = torch.randn(2, 3, 29, 5)
    out, final = naive_linear_attention(q, k, v, slopes, state)
    want = torch.autograd.grad((out, final), (q, k, v, state), (grad, torch.ones_like(final)))
    out, final = chunked_linear_attention(q, k, v, slopes, state, block=16)
    got = torch.autograd.grad((out, final), (q, k, v, state), (grad, torch.ones_like(final)))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("t,f,e", [(37, 8, 5), (16, 16, 17), (3, 32, 16)])
def test_triton_forward_and_backward_match_the_naive_oracle(triton_target, dtype, tol, t, f, e):
    q, k, v, slopes = _inputs(t=t, f=f, e=e, dtype=dtype)
    q, k, v = (x.to(triton_target).requires_grad_(True) for x in (q, k, v))
    slopes = slopes.to(triton_target)
    state = torch.randn(2, 3, f, e, device=triton_target)
    want, want_state = naive_linear_attention(q.float(), k.float(), v.float(), slopes, state)
    out, final = lightning_attention(q, k, v, slopes, state, block=16, backend="triton")
    assert out.dtype == dtype and final.dtype == torch.float32
    scale = want.abs().max().item()
    assert (out.float() - want).abs().max().item() <= tol * scale
    assert (final - want_state).abs().max().item() <= tol * want_state.abs().max().item()
    grad = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    ref = torch.autograd.grad(want, (q, k, v), grad)
    for a, b in zip(got, ref):
        assert (a.float() - b.float()).abs().max().item() <= tol * max(b.float().abs().max().item(), 1.0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_dtype_returns_float32_from_16bit_inputs(triton_target, backend):
    q, k, v, slopes = _inputs(t=37, f=16, e=17, dtype=torch.bfloat16)
    dev = triton_target if backend == "triton" else "cpu"
    want, _ = naive_linear_attention(q.float(), k.float(), v.float(), slopes)
    out, _ = lightning_attention(q.to(dev), k.to(dev), v.to(dev), slopes.to(dev), block=16, backend=backend,
                                 out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert (out.cpu() - want).abs().max().item() <= 2e-2 * want.abs().max().item()
    empty, _ = lightning_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], slopes, out_dtype=torch.float32)
    assert empty.dtype == torch.float32 and empty.shape[2] == 0


def test_triton_forward_with_repeated_kv_heads_matches_per_head_reference(triton_target):
    """GQA callers repeat k/v per query head; the kernel sees equal heads and must not mix slopes across heads."""
    q, k, v, slopes = _inputs(heads=4, t=33)
    k = k[:, :2].repeat_interleave(2, dim=1)
    v = v[:, :2].repeat_interleave(2, dim=1)
    want, _ = naive_linear_attention(q, k, v, slopes)
    dev = triton_target
    out, _ = lightning_attention(q.to(dev), k.to(dev), v.to(dev), slopes.to(dev), block=16, backend="triton")
    assert torch.allclose(out.cpu(), want, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gqa_keys_and_values_are_read_in_place_forward_and_backward(triton_target, backend):
    """k / v with fewer heads than q (each shared by a group of query heads, each with its own decay): the same as
    the oracle on repeated heads, gradients summed over each group."""
    q, _, _, slopes = _inputs(heads=4, t=41, f=8, e=5)
    k, v = torch.rand(2, 2, 41, 8), torch.randn(2, 2, 41, 5)
    state = torch.randn(2, 4, 8, 5)
    dev = triton_target if backend == "triton" else "cpu"
    leaves = [x.to(dev).requires_grad_(True) for x in (q, k, v, state)]
    out, final = lightning_attention(*leaves[:3], slopes.to(dev), leaves[3], block=16, backend=backend)
    grad = torch.randn(out.shape)
    got = torch.autograd.grad((out, final), leaves, (grad.to(dev), torch.ones_like(final)))
    ref_leaves = [x.clone().requires_grad_(True) for x in (q, k, v, state)]
    want, want_final = naive_linear_attention(ref_leaves[0], ref_leaves[1].repeat_interleave(2, 1),
                                              ref_leaves[2].repeat_interleave(2, 1), slopes, ref_leaves[3])
    ref = torch.autograd.grad((want, want_final), ref_leaves, (grad, torch.ones_like(want_final)))
    assert out.shape == (2, 4, 41, 5) and torch.allclose(out.cpu(), want, atol=1e-4)
    assert torch.allclose(final.cpu(), want_final, atol=1e-4)
    for a, b in zip(got, ref):
        assert a.shape == b.shape and torch.allclose(a.cpu(), b, atol=1e-3)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("t,e", [(37, 5), (1, 17), (70, 65)])
def test_normalized_triton_forward_divides_in_the_kernel(triton_target, dtype, tol, t, e):
    """``normalize_last``: the fused kernel (no gradient) equals the oracle's columns divided by its last one, from
    an initial state whose last column is the denominator's, with GQA heads and keys of zero weight (padding; a
    row that sees none has output 0); its final state equals the unnormalised pass's."""
    q, _, _, slopes = _inputs(heads=4, t=t, f=8, e=e, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    k = torch.rand(2, 2, t, 8, generator=gen).to(dtype)
    v = torch.randn(2, 2, t, e, generator=gen)
    v[..., -1] = 1.0
    v[0, :, : t // 2, -1] = 0.0  # the first half of row 0 is padding: no weight, no value
    v[0, :, : t // 2] = 0.0
    k[0, :, : t // 2] = 0.0
    v = v.to(dtype)
    state = torch.rand(2, 4, 8, e)
    state[0] = 0.0  # row 0 starts empty: its padded queries see no key at all
    full, want_state = naive_linear_attention(q.float(), k.float().repeat_interleave(2, 1),
                                              v.float().repeat_interleave(2, 1), slopes, state)
    num, den = full[..., :-1], full[..., -1:]
    want = torch.where(den > 1e-12, num / den.clamp_min(1e-12), torch.zeros_like(num))
    dev = triton_target
    with torch.no_grad():
        out, final = lightning_attention(q.to(dev), k.to(dev), v.to(dev), slopes.to(dev), state.to(dev), block=16,
                                         backend="triton", out_dtype=torch.float32, normalize_last=True)
        torch_out, torch_final = lightning_attention(q, k, v, slopes, state, block=16, backend="torch",
                                                     out_dtype=torch.float32, normalize_last=True)
    assert out.shape == (2, 4, t, e - 1)
    assert (out.cpu() - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())
    assert (torch_out - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())
    assert torch.allclose(final.cpu(), want_state, atol=tol * want_state.abs().max().item())
    assert torch.allclose(torch_final, want_state, atol=tol * want_state.abs().max().item())
    if t > 1:
        assert out[0, :, : t // 2].abs().max().item() == 0.0


def test_bad_shapes_are_refused_clearly():
    q, k, v, slopes = _inputs()
    with pytest.raises(ValueError, match="must share"):
        lightning_attention(q, k[:, :, :5], v, slopes)
    with pytest.raises(ValueError, match="divide q's"):
        lightning_attention(q, k[:, :2], v[:, :2], slopes)
    with pytest.raises(ValueError, match="slopes must be"):
        lightning_attention(q, k, v, slopes[:2])
    with pytest.raises(ValueError, match="backend must be one of"):
        lightning_attention(q, k, v, slopes, backend="cuda")


@pytest.mark.parametrize("with_state", [False, True])
def test_triton_backward_through_both_states_matches_the_naive_oracle(triton_target, with_state):
    """The backward kernel runs (dQ forward, dK / dV reversed) plus the state terms: gradients of the output and of
    the final state, with respect to q, k, v and the initial state."""
    q, k, v, slopes = _inputs(t=35, f=16, e=8)
    dev = triton_target
    q, k, v = (x.to(dev).requires_grad_(True) for x in (q, k, v))
    slopes = slopes.to(dev)
    state = torch.randn(2, 3, 16, 8, device=dev, requires_grad=True) if with_state else None
    wanted = (q, k, v, state) if with_state else (q, k, v)
    grads = (torch.randn(2, 3, 35, 8, device=dev), torch.randn(2, 3, 16, 8, device=dev))
    want = torch.autograd.grad(naive_linear_attention(q, k, v, slopes, state), wanted, grads)
    got = torch.autograd.grad(lightning_attention(q, k, v, slopes, state, block=16, backend="triton"), wanted, grads)
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() <= 1e-4 * max(b.abs().max().item(), 1.0)
