"""Design note 58: ``landmark``'s inference retrieval in chunks of query blocks and ``dma``'s key ranking in
``O(T log T)`` give exactly what the code before (``prior_scale``, verbatim) gave -- outputs, density, block lists,
tiles -- on random inputs with odd lengths, GQA, bf16 / fp32, ties, padding; and they no longer make ``[T, T / block]``
logits or ``[chunk, T]`` comparisons."""

import math
import types

import pytest
import torch
from prior_scale import dynamic_mask_lists_before, kept_until_before, landmark_before
from torch.utils._python_dispatch import TorchDispatchMode

import patchattn
from patchattn.methods import dma, landmark
from patchattn.testing import left_pad, tiny_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class _LargestOutput(TorchDispatchMode):
    """The largest tensor (elements) any aten operator returned, among those whose last dimension is ``last``
    (``None``: all)."""

    def __init__(self, last=None):
        super().__init__()
        self.last, self.largest = last, 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() and (self.last is None or t.shape[-1] == self.last):
                self.largest = max(self.largest, t.numel())
        return out


# ---- landmark ------------------------------------------------------------------------------------------------------
def _landmark_state(block, top_k, local, pool_query, offset, backend):
    config = landmark.LandmarkConfig(block_size=block, top_k=top_k, local_blocks=local, backend=backend)
    stats = {}
    return types.SimpleNamespace(config=config, landmark_query=pool_query, landmark_offset=offset,
                                 record=stats.update, stats=stats)


def _landmark_case(seed, device):
    """Random shapes: batch 1-2, 1-3 KV heads, groups 1-2, lengths up to 200 (odd ones, queries starting mid-block),
    block 16 / 32, top_k 1-5 or every block, 1-2 local blocks, soft-capping, fp32 / bf16."""
    gen = torch.Generator().manual_seed(seed)
    b, hkv, group = 1 + seed % 2, 1 + seed % 3, 1 + (seed // 3) % 2
    tk = int(torch.randint(2, 200, (1,), generator=gen))
    tq = tk if seed % 4 == 0 else int(torch.randint(1, tk + 1, (1,), generator=gen))
    dtype = torch.bfloat16 if seed % 5 == 1 else torch.float32
    q, k, v = (torch.randn(b, h, t, 16, generator=gen).to(device, dtype)
               for h, t in ((hkv * group, tq), (hkv, tk), (hkv, tk)))
    pool_query, offset = torch.randn(hkv, 16, generator=gen).to(device), torch.randn(hkv, generator=gen).to(device) + 2
    config = {"block": (16, 32)[seed % 2], "top_k": (1, 2, 3, 5, 1 << 30)[seed % 5], "local": 1 + (seed // 2) % 2}
    return (q, k, v), pool_query, offset, config, (None, 4.0)[seed % 3 == 2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("chunk_scores", [1, 700, landmark.RETRIEVAL_CHUNK_SCORES])
def test_landmark_inference_is_the_code_before_exactly(device, seed, chunk_scores):
    """Bit for bit, with chunks of the smallest size (two query blocks), a few, and the default (one chunk).  On
    CUDA the engine path is called directly: the method runs the fused kernel there (not bit-identical; checked
    against this path in test_landmark.py)."""
    (q, k, v), pool_query, offset, config, softcap = _landmark_case(seed, device)
    backend = "torch" if device == "cpu" else "auto"
    before = _landmark_state(**config, pool_query=pool_query, offset=offset, backend=backend)
    after = _landmark_state(**config, pool_query=pool_query, offset=offset, backend=backend)
    with torch.no_grad():
        want = landmark_before(before, q, k, v, 0.25, softcap, config["top_k"])
        if device == "cpu":
            got = landmark.grouped_landmark_attention(after, q, k, v, 0.25, softcap, config["top_k"], chunk_scores)
        else:
            got = landmark._per_rank_landmark_attention(after, q, k, v, 0.25, softcap, config["top_k"],
                                                        chunk_scores, backend)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(after.stats["density"], before.stats["density"])


def test_landmark_never_makes_every_row_s_logits_at_once():
    """The code before held ``[B, Hq, rows, NC]`` fp32 logits (34 GB at 128k, Llama-3-8B shape); a chunk holds
    two query blocks' here, and the widest ``NC`` tensor left is the per-query-block union ``[B, Hq, NQ, NC]``."""
    q, k, v = (torch.randn(1, h, 1024, 16) for h in (4, 2, 2))
    n_c, rows = 1024 // 16, 1024
    state = _landmark_state(16, 2, 1, torch.randn(2, 16), torch.randn(2) + 2, "torch")
    with torch.no_grad():
        with _LargestOutput(last=n_c) as before:
            landmark_before(state, q, k, v, 0.25, None, 2)
        with _LargestOutput(last=n_c) as after:
            landmark.grouped_landmark_attention(state, q, k, v, 0.25, None, 2, chunk_scores=4 * 32 * n_c)
    assert before.largest == 4 * rows * n_c
    assert after.largest <= 4 * rows * n_c // 8


def test_landmark_padded_batch_through_a_model_is_the_code_before(monkeypatch):
    model = tiny_model("qwen3")
    inputs = left_pad({"input_ids": torch.randint(3, 100, (2, 77))}, [0, 19])
    with patchattn.patched(model, "landmark", block_size=16, top_k=2), torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if ".patchattn.landmark_" in name:
                p.add_(torch.randn(p.shape, generator=gen))
        got = model(**inputs).logits
        monkeypatch.setattr(landmark, "grouped_landmark_attention", landmark_before)
        want = model(**inputs).logits
    assert torch.equal(got, want)


# ---- dma -----------------------------------------------------------------------------------------------------------
def _scores(seed, device):
    """[2, 3, T] selection biases: normal, rounded (many ties), all equal, with NaN, -0.0 among 0.0, inf."""
    gen = torch.Generator().manual_seed(seed)
    length = int(torch.randint(1, 300, (1,), generator=gen))
    bias = torch.randn(2, 3, length, generator=gen)
    kind = seed % 6
    if kind == 1:
        bias = bias.round()
    elif kind == 2:
        bias = torch.zeros_like(bias)
    elif kind == 3:
        bias[0, 1, ::3] = float("nan")
    elif kind == 4:
        bias = bias.round().clamp(min=0)
        bias[1, 0, ::2] = -0.0
    elif kind == 5:
        bias[1, 2, ::4] = float("inf")
        bias[0, 0, 1::5] = -float("inf")
    window = int(torch.randint(1, length + 2, (1,), generator=gen))
    return bias.to(device), window, (0.0, 1.0, 3.0)[seed % 3]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(60))
def test_kept_until_is_the_pairwise_ranking_exactly(device, seed):
    bias, window, recency = _scores(seed, device)
    got = dma.kept_until(bias, window, recency)
    assert got.dtype == torch.long and torch.equal(got, kept_until_before(bias, window, recency))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(30))
def test_block_lists_and_tiles_are_the_code_before_exactly(device, seed):
    bias, window, recency = _scores(seed, device)
    until = kept_until_before(bias, window, recency)
    length = bias.shape[-1]
    for block in (16, 32):
        q_len = 1 + (seed * 7) % length
        offset = length - q_len
        pad = offset % block
        args = (until, (offset - pad) // block, math.ceil((q_len + pad) / block), block, length)
        for got, want in zip(dma.dynamic_mask_lists(*args), dynamic_mask_lists_before(*args), strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want)


def test_kept_until_makes_no_key_by_key_comparison():
    """The code before compared every key with every other (``[B, H, 256, T]`` a chunk); now every tensor is
    ``O(T)`` per head."""
    bias = torch.randn(1, 2, 4096)
    with _LargestOutput() as before:
        kept_until_before(bias, 64, 1.0)
    with _LargestOutput() as after:
        dma.kept_until(bias, 64, 1.0)
    assert before.largest >= 2 * 256 * 4096
    assert after.largest <= 2 * 4097


def test_prefix_kth_largest_on_repeated_values():
    values = torch.randint(0, 9, (3, 50))
    got = dma.prefix_kth_largest(values, 4)
    for row in range(3):
        for p in range(50):
            prefix = values[row, :p + 1].sort(descending=True).values
            assert got[row, p] == (prefix[3] if p >= 3 else -1)


def test_dma_padded_batch_through_a_model_is_the_code_before(monkeypatch):
    model = tiny_model("llama")
    inputs = left_pad({"input_ids": torch.randint(3, 100, (2, 77))}, [0, 19])
    with patchattn.patched(model, "dma", window=12, block_size=16), torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name.endswith(".patchattn.a"):
                p.copy_(torch.randn(p.shape, generator=gen) * 2)
        got = model(**inputs).logits
        monkeypatch.setattr(dma, "kept_until", kept_until_before)
        monkeypatch.setattr(dma, "dynamic_mask_lists", dynamic_mask_lists_before)
        want = model(**inputs).logits
    assert torch.equal(got, want)
