"""A context-parallel chunk (queries = prompt positions [start, stop), keys = [0, stop)) gives the rows of the
whole prompt's call, through each method's Triton selection and kernels (the CPU interpreter here, compiled on a
GPU) and its torch path: the chunk semantics the ranks rely on, in one process."""

from __future__ import annotations

import pytest
import torch

from patchattn.distributed import plan_shards
from patchattn.distributed.context_parallel import chunk_attention

from .cp_cases import BLOCK, METHODS, PROMPT, patched_tiny_llama


def _qkv(device, tokens: int = PROMPT, batch: int = 2):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(batch, 4, tokens, 16, generator=gen)
    k = torch.randn(batch, 2, tokens, 16, generator=gen)
    v = torch.randn(batch, 2, tokens, 16, generator=gen)
    return q.to(device), k.to(device), v.to(device)


def _check_chunks(method: str, backend: str, device, atol: float, tokens: int = PROMPT, batch: int = 2,
                  plans=(("zigzag", 3), ("contiguous", 3))) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = patched_tiny_llama(method, backend=backend).to(device)
    module = model.model.layers[1].self_attn  # hip keeps layer 0 dense
    q, k, v = _qkv(device, tokens, batch)
    whole, _ = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation](module, q, k, v, None, scaling=0.25)
    checked = 0
    for balance, world in plans:
        for rank_chunks in plan_shards(tokens, world, BLOCK, balance).chunks:
            for start, stop in rank_chunks:
                got = chunk_attention(module, q[:, :, start:stop], k[:, :, :stop], v[:, :, :stop],
                                      prompt_tokens=tokens, scaling=0.25)
                err = (got - whole[:, start:stop]).abs().max().item()
                assert err < atol, f"{method} ({backend}) chunk [{start}, {stop}): max error {err:.2e}"
                checked += 1
    assert checked >= 3
    assert module.patchattn.context.prefill_tokens is None  # the hook is set only during the call


@pytest.mark.parametrize("method", ["hip", "blocktopk"])
def test_chunks_equal_the_whole_prompt_rows_on_the_triton_selection(method, triton_target):
    # The fused selection kernels (HiP's tree search, block top-k's scores and choice) at an offset.  The CPU
    # interpreter is slow: one row, 5 blocks (the last partial), a zig-zag split over 2 ranks (3 chunks).
    if triton_target == "cuda":
        _check_chunks(method, "triton", torch.device("cuda"), 2e-3)  # fp32 dots may run as tf32 on a GPU
    else:
        _check_chunks(method, "triton", torch.device("cpu"), 1e-5, tokens=4 * BLOCK + 5, batch=1,
                      plans=(("zigzag", 2),))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_chunks_equal_the_whole_prompt_rows_on_the_torch_path(method):
    _check_chunks(method, "torch", torch.device("cpu"), 1e-5)


def test_a_one_block_chunk_holding_the_last_block_reads_it_whole():
    # The last chunk is the partial last block alone: last_block_dense must still make it read every key.
    model = patched_tiny_llama("hip")
    module = model.model.layers[1].self_attn
    q, k, v = _qkv("cpu")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    whole, _ = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation](module, q, k, v, None, scaling=0.25)
    start = PROMPT // BLOCK * BLOCK
    got = chunk_attention(module, q[:, :, start:], k, v, prompt_tokens=PROMPT, scaling=0.25)
    assert torch.allclose(got, whole[:, start:], atol=1e-5)
    with pytest.raises(ValueError, match="patched attention module"):
        from patchattn.testing import tiny_model

        chunk_attention(tiny_model("llama").model.layers[0].self_attn, q, k, v, prompt_tokens=PROMPT)
