"""kernels/received: the chunked torch path and the two-pass Triton kernel (interpreter on CPU) against a brute-force
oracle (the whole softmax materialised in float64, then averaged over the query rows): fp32 / bf16 / fp16, head dims
64-128 (80 and 96 padded inside), odd lengths, Tq != Tk, GQA and MQA, masks (bool and additive, rows that see no
key), one-row chunks, and the validation errors."""

import pytest
import torch
from blocksparse_cases import kernel_options

from patchattn.kernels.received import received_attention

# Largest |actual - expected| relative to max |expected|.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


def brute_force(q, k, *, scale=None, mask=None):
    """The definition on the materialised softmax, in float64 (from the inputs as given: bf16 values are exact)."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return torch.softmax(scores, -1).nan_to_num(0.0).mean(2)


def _case(batch=2, heads=4, kv_heads=2, q_len=37, kv_len=70, dim=32, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=gen) * 2
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=gen)
    return q.to(dtype), k.to(dtype)


def _check(got, want, dtype):
    assert got.shape == want.shape
    assert torch.isfinite(got).all(), "NaN or Inf"
    err = (got.double() - want).abs().max().item() / want.abs().max().item()
    assert err <= TOLERANCE[dtype], f"{err:.3g} > {TOLERANCE[dtype]:.3g}"


SHAPES = {  # (batch, heads, kv_heads, q_len, kv_len)
    "square": (2, 4, 4, 70, 70),
    "gqa-odd": (2, 4, 2, 37, 70),
    "mqa-more-queries": (1, 3, 1, 45, 29),
    "one-row": (2, 2, 2, 1, 33),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("chunk_rows", [256, 1, 16])
def test_torch_path_matches_brute_force(shape, dtype, chunk_rows):
    q, k = _case(*SHAPES[shape], dtype=dtype)
    got = received_attention(q, k, scale=0.3, backend="torch", chunk_rows=chunk_rows)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _check(got, brute_force(q, k, scale=0.3), dtype)


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
def test_torch_path_masks_with_rows_that_see_no_key(additive):
    q, k = _case(2, 4, 2, 21, 30)
    gen = torch.Generator().manual_seed(1)
    allowed = torch.rand(2, 1, 21, 30, generator=gen) < 0.6
    allowed[0, 0, 5] = False  # a row that sees no key adds nothing (never NaN)
    allowed[1, 0, :, 7] = False  # a key no row sees receives exactly 0
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")) if additive else allowed
    got = received_attention(q, k, mask=mask, backend="torch", chunk_rows=4)
    _check(got, brute_force(q, k, mask=allowed), torch.float32)
    assert torch.equal(got[1, :, 7], torch.zeros(4))


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("tiles", [None, (16, 16)], ids=["blocks", "tiles16"])
def test_triton_matches_brute_force(triton_device, shape, tiles):
    q, k = (t.to(triton_device) for t in _case(*SHAPES[shape]))
    with kernel_options(interpreter_tiles=tiles):
        got = received_attention(q, k, scale=0.3, backend="triton")
    _check(got.cpu(), brute_force(q.cpu(), k.cpu(), scale=0.3), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 80, 96, 128])
def test_triton_dtypes_and_head_dims(triton_device, dtype, dim):
    """16-bit inputs: the products are exact in fp32, so the kernel meets the fp32 tolerance against the oracle on
    the same (rounded) inputs, and the torch path (which upcasts them) agrees."""
    q, k = (t.to(triton_device) for t in _case(2, 4, 2, 41, 50, dim=dim, dtype=dtype, seed=dim))
    with kernel_options(interpreter_tiles=(16, 32)):
        got = received_attention(q, k, backend="triton")
    assert got.dtype == torch.float32
    _check(got.cpu(), brute_force(q.cpu(), k.cpu()), dtype)
    _check(got.cpu(), received_attention(q.cpu(), k.cpu(), backend="torch").double(), dtype)


def test_auto_takes_torch_for_masks_and_float64(triton_device):
    q, k = _case(1, 2, 2, 9, 9)
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool)
    _check(received_attention(q, k, mask=mask), brute_force(q, k), torch.float32)  # auto: torch path, no error
    assert received_attention(q.double(), k.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="no mask"):
        received_attention(q, k, mask=mask, backend="triton")


def test_bad_inputs_are_clear():
    q, k = _case(1, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="multiple of key heads"):
        received_attention(q[:, :3], k)
    with pytest.raises(ValueError, match="one floating dtype"):
        received_attention(q.half(), k)
    with pytest.raises(ValueError, match="does not broadcast"):
        received_attention(q, k, mask=torch.ones(8, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_rows"):
        received_attention(q, k, chunk_rows=0)
    with pytest.raises(ValueError, match="backend"):
        received_attention(q, k, backend="cuda")
    with pytest.raises(ValueError, match="4-D"):
        received_attention(q[0], k[0])
