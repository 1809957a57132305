"""kernels/hedgehog: the fused Triton feature map (interpreter on CPU) against the torch reference, fp32 / bf16,
odd lengths and head dims, the backend switch and its gradient rule, clear errors."""

import pytest
import torch

from patchattn.kernels.hedgehog import hedgehog_features, hedgehog_reference


def _inputs(heads=3, t=37, d=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, heads, t, d, generator=gen).to(dtype)
    weight = torch.eye(d).repeat(heads, 1, 1) + 0.3 * torch.randn(heads, d, d, generator=gen)
    return x, weight


def test_reference_is_two_softmaxes_of_the_per_head_projection():
    x, weight = _inputs(heads=2, t=5, d=4)
    got = hedgehog_reference(x, weight)
    for h in range(2):
        proj = x[:, h] @ weight[h]
        assert torch.allclose(got[:, h, :, :4], proj.softmax(-1), atol=1e-6)
        assert torch.allclose(got[:, h, :, 4:], (-proj).softmax(-1), atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("t,d", [(37, 16), (64, 32), (5, 24), (130, 8)])
def test_triton_forward_matches_the_reference(triton_target, dtype, tol, t, d):
    x, weight = _inputs(t=t, d=d, dtype=dtype)
    want = hedgehog_reference(x, weight)
    got = hedgehog_features(x.to(triton_target), weight.to(triton_target), backend="triton")
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.cpu() - want).abs().max().item() <= tol
    assert torch.allclose(got.cpu().sum(-1), torch.full(want.shape[:-1], 2.0), atol=1e-4)  # two distributions
    low = hedgehog_features(x.to(triton_target), weight.to(triton_target), backend="triton", out_dtype=dtype)
    assert low.dtype == dtype and (low.float().cpu() - want).abs().max().item() <= max(tol, 1e-2)


def test_calls_that_need_gradients_take_the_differentiable_path(triton_target):
    x, weight = _inputs()
    weight = weight.to(triton_target).requires_grad_(True)
    out = hedgehog_features(x.to(triton_target), weight, backend="triton")
    assert out.requires_grad
    out[..., 0].sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_bad_inputs_are_refused_clearly():
    x, weight = _inputs()
    with pytest.raises(ValueError, match=r"weight \[H, D, D\]"):
        hedgehog_features(x, weight[:2])
    with pytest.raises(ValueError, match="backend must be one of"):
        hedgehog_features(x, weight, backend="cuda")
    empty = hedgehog_features(x[:, :, :0], weight, backend="triton")
    assert empty.shape == (2, 3, 0, 32)
