"""kernels/colclass: the chunked torch path and the Triton forward (interpreter on CPU) against a brute-force oracle
(the whole softmax materialised in float64, then summed per class): fp32 / bf16 / fp16, head dims 64-128 (80 and 96
padded inside), odd lengths, GQA and MQA, left padding, decode (Tq = 1), rows that see no key or no member of a
class (zeros, never NaN), empty classes, and the validation errors."""

import pytest
import torch
from blocksparse_cases import kernel_options

from patchattn.kernels import colclass
from patchattn.kernels.colclass import class_attention, reference

# Largest |actual - expected| relative to max |expected| (masses: absolute, they are in [0, 1]).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def brute_force(q, k, v, classes, *, scale=None, kv_start=None):
    """The definitions on the materialised softmax, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_len, kv_len = q.shape[2], k.shape[2]
    keys = torch.arange(kv_len)
    allowed = (keys[None, :] <= (torch.arange(q_len) + kv_len - q_len)[:, None])[None, None]
    if kv_start is not None:
        allowed = allowed & (keys >= kv_start.long().view(-1, 1, 1, 1))
    probs = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    member = [((classes.long() >> c) & 1).bool()[:, None, None, :] for c in range(3)]
    mass = torch.stack([(probs * m).sum(-1) for m in member], -1)
    restricted = (probs * member[0]) @ v
    normalised = torch.where(mass[..., :1] > 0, restricted / mass[..., :1].clamp_min(1e-300), 0.0)
    return mass, normalised, (probs * member[1]) @ v


def _case(batch=2, heads=4, kv_heads=2, q_len=37, kv_len=70, dim=32, dtype=torch.float32, seed=0, starts=None,
          classes=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=gen)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=gen)
    if classes is None:
        classes = torch.randint(0, 8, (batch, kv_len), generator=gen, dtype=torch.int8)
    start = None if starts is None else torch.tensor(starts, dtype=torch.int32)
    return q.to(dtype), k.to(dtype), v.to(dtype), classes, start


def _check(got, want, dtype):
    tol = TOLERANCE[dtype]
    for name, a, b in zip(("mass", "normalised", "weighted"), got, want):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name}: NaN or Inf"
        scale = 1.0 if name == "mass" else max(1.0, b.abs().max().item())
        err = (a.double() - b).abs().max().item() / scale
        assert err <= tol, f"{name}: {err:.3g} > {tol:.3g}"


SHAPES = {  # (batch, heads, kv_heads, q_len, kv_len, starts)
    "prefill": (2, 4, 2, 70, 70, None),
    "gqa-odd": (2, 4, 2, 37, 70, [0, 5]),
    "mqa-padded": (2, 3, 1, 45, 45, [3, 0]),
    "decode": (2, 4, 2, 1, 53, [0, 7]),
    "mha": (1, 2, 2, 17, 33, None),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reference_matches_brute_force(shape, dtype, monkeypatch):
    batch, heads, kv_heads, q_len, kv_len, starts = SHAPES[shape]
    q, k, v, classes, start = _case(batch, heads, kv_heads, q_len, kv_len, dtype=dtype, starts=starts)
    want = brute_force(q, k, v, classes, kv_start=start, scale=0.3)
    _check(class_attention(q, k, v, classes, kv_start=start, scale=0.3, backend="torch"), want, dtype)
    monkeypatch.setattr(reference, "CHUNK_SCORE_ELEMENTS", 1)  # one query row per chunk
    _check(class_attention(q, k, v, classes, kv_start=start, scale=0.3, backend="torch"), want, dtype)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("tiles", [None, (16, 16)], ids=["blocks", "tiles16"])
def test_triton_matches_brute_force(triton_device, shape, tiles):
    batch, heads, kv_heads, q_len, kv_len, starts = SHAPES[shape]
    q, k, v, classes, start = (t if t is None else t.to(triton_device) for t in
                               _case(batch, heads, kv_heads, q_len, kv_len, starts=starts))
    with kernel_options(interpreter_tiles=tiles):
        got = class_attention(q, k, v, classes, kv_start=start, backend="triton")
    _check([t.cpu() for t in got], brute_force(*(t if t is None else t.cpu() for t in (q, k, v, classes)),
                                               kv_start=None if start is None else start.cpu()), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 80, 96, 128])
def test_triton_dtypes_and_head_dims(triton_device, dtype, dim):
    q, k, v, classes, start = _case(2, 4, 2, 21, 40, dim=dim, dtype=dtype, starts=[0, 4], seed=dim)
    q, k, v, classes, start = (t.to(triton_device) for t in (q, k, v, classes, start))
    with kernel_options(interpreter_tiles=(16, 16)):
        got = class_attention(q, k, v, classes, kv_start=start, backend="triton")
    assert all(t.dtype == torch.float32 for t in got)
    want = brute_force(*(t.cpu() for t in (q, k, v, classes)), kv_start=start.cpu())
    _check([t.cpu() for t in got], want, dtype)
    torch_path = class_attention(*(t.cpu() for t in (q, k, v, classes)), kv_start=start.cpu(), backend="torch")
    _check([t.cpu() for t in got], [t.double() for t in torch_path], dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rows_without_keys_or_members_give_zeros(backend, request):
    """Padded query rows see no key at all; a class with no member anywhere, and a class whose members all lie after
    a row (causally hidden) give 0 mass and 0 outputs, never NaN."""
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    batch, kv_len = 2, 40
    classes = torch.zeros(batch, kv_len, dtype=torch.int8)
    classes[:, 30:] = 1  # bit 0 only on late keys: rows before them see none; bit 1 and 2: empty classes
    q, k, v, _, start = _case(batch, 4, 2, kv_len, kv_len, classes=classes, starts=[0, 6])
    got = [t.cpu() for t in class_attention(*(t.to(device) for t in (q, k, v, classes)), kv_start=start.to(device),
                                            backend=backend)]
    _check(got, brute_force(q, k, v, classes, kv_start=start), torch.float32)
    mass, normalised, weighted = got
    assert torch.equal(mass[1, :, :6], torch.zeros_like(mass[1, :, :6]))  # padded rows: nothing seen
    assert torch.equal(normalised[:, :, :30], torch.zeros_like(normalised[:, :, :30]))  # no bit-0 key seen yet
    assert (mass[:, :, 30:, 0] > 0).all() and (normalised[:, :, 30:].abs().sum(-1) > 0).all()
    assert torch.equal(mass[..., 1:], torch.zeros_like(mass[..., 1:])) and not weighted.any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_key_in_every_class_sums_to_one(backend, request):
    """All keys of bit 0 and bit 1: masses are 1 on every row that sees a key, and both outputs are the ordinary
    attention output."""
    device = request.getfixturevalue("triton_device") if backend == "triton" else "cpu"
    q, k, v, _, _ = _case(1, 2, 1, 19, 19, classes=torch.full((1, 19), 7, dtype=torch.int8))
    classes = torch.full((1, 19), 7, dtype=torch.uint8)
    mass, normalised, weighted = (t.cpu() for t in class_attention(*(t.to(device) for t in (q, k, v, classes)),
                                                                  backend=backend))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1),
                                                             is_causal=True)
    assert (mass - 1).abs().max() <= 1e-6
    assert (normalised - dense).abs().max() <= 1e-5 and (weighted - dense).abs().max() <= 1e-5


def test_bad_inputs_are_clear():
    q, k, v, classes, _ = _case(1, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="int8 or uint8"):
        class_attention(q, k, v, classes.bool())
    with pytest.raises(ValueError, match="int8 or uint8"):
        class_attention(q, k, v, classes[:, :4])
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        class_attention(q[:, :3], k, v, classes)
    with pytest.raises(ValueError, match="must be <= Tk"):
        class_attention(q, k[:, :, :4], v[:, :, :4], classes[:, :4])
    with pytest.raises(ValueError, match="kv_start"):
        class_attention(q, k, v, classes, kv_start=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="backend"):
        class_attention(q, k, v, classes, backend="cuda")
    with pytest.raises(ValueError, match="one floating dtype"):
        class_attention(q.half(), k, v, classes)


def test_gradients_are_refused_with_a_warning():
    """Forward only: inputs that need a gradient get a warning and outputs that carry none."""
    q, k, v, classes, _ = _case(1, 2, 2, 8, 8)
    q.requires_grad_(True)
    with pytest.warns(UserWarning, match="forward only"):
        out = class_attention(q, k, v, classes, backend="torch")
    assert not any(t.requires_grad for t in out)
    assert colclass.BACKENDS == ("auto", "triton", "torch")
