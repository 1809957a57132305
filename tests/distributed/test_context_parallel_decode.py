"""After a context-parallel prefill, the gathered KV cache lets decoding continue in one process exactly as after
a one-process prefill (two CPU processes, gloo); and what ``context_parallel`` refuses, it refuses clearly."""

from __future__ import annotations

import pytest
import torch

from .cp_cases import cache_kwarg, cache_of, patched_tiny_llama, prompt, run_two_ranks

STEPS = 4


def _greedy(model, logits, cache, steps: int):
    """``steps`` greedy decode steps from a prefill's last logits and cache: (tokens [B, steps], logits)."""
    tokens, seen = [], []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        out = model(token, **cache_kwarg(model, cache), use_cache=True)
        logits, cache = out.logits, cache_of(out)
        seen.append(logits)
    return torch.cat(tokens, dim=1), torch.cat(seen, dim=1)


def _check_decode(rank: int, methods: tuple) -> None:
    from patchattn.distributed import context_parallel

    ids = prompt()
    for method in methods:
        model = patched_tiny_llama(method)
        with torch.no_grad():
            out = model(ids, use_cache=True)
            want_tokens, want_logits = _greedy(model, out.logits, cache_of(out), STEPS)
            cp = context_parallel(model)
            out = cp(ids, use_cache=True)
            logits = cp.gather(out.logits)
            cache = cp.gather_cache(cache_of(out))
            assert cache.get_seq_length() == ids.shape[1]
            tokens, got_logits = _greedy(model, logits, cache, STEPS)
            # generate() continues from the gathered cache too (the prompt plus the first token; it feeds the rest)
            cp_out = cp(ids, use_cache=True)
            first = cp.gather(cp_out.logits)[:, -1].argmax(-1, keepdim=True)
            whole = cp.gather_cache(cache_of(cp_out))
            generated = model.generate(torch.cat([ids, first], dim=1), **cache_kwarg(model, whole),
                                       max_new_tokens=STEPS - 1, do_sample=False)
        assert torch.equal(tokens, want_tokens), f"{method} rank {rank}: decoded tokens differ"
        assert torch.allclose(got_logits, want_logits, atol=2e-5), f"{method} rank {rank}: decode logits differ"
        assert torch.equal(generated[:, ids.shape[1]:], want_tokens), f"{method}: generate differs"


def _check_refusals(rank: int) -> None:
    import patchattn
    from patchattn.distributed import context_parallel, plan_shards
    from patchattn.testing import tiny_model

    with pytest.raises(ValueError, match="patched model"):
        context_parallel(tiny_model("llama"))
    with pytest.raises(NotImplementedError, match="supports dense, blocktopk"):
        model = tiny_model("llama")
        patchattn.patch(model, "hyper")
        context_parallel(model)
    model = patched_tiny_llama("streaming")
    with pytest.raises(ValueError, match="balance must be one of zigzag, contiguous"):
        context_parallel(model, balance="striped")
    with pytest.raises(ValueError, match="exchange must be one of allgather, ring, ring_attention"):
        context_parallel(model, exchange="broadcast")
    with pytest.raises(NotImplementedError, match="runs the dense method only"):
        context_parallel(model, exchange="ring_attention")
    cp = context_parallel(model)
    ids = prompt()
    with pytest.raises(ValueError, match="not one run of ones"):  # a hole in a row: not padding
        cp(ids, attention_mask=torch.ones_like(ids).index_fill_(1, torch.tensor([40]), 0))
    with pytest.raises(ValueError, match="position_ids must be"):
        cp(ids, position_ids=torch.arange(ids.shape[1] - 1)[None])
    with pytest.raises(ValueError, match="at least 2 blocks"):
        cp(ids[:, :10])
    with pytest.raises(ValueError, match="at least 3 blocks"):
        plan_shards(20, 3, 16)
    with pytest.raises(RuntimeError, match="only inside ContextParallel"):  # the implementation, called outside
        from patchattn.distributed.context_parallel import context_parallel_attention
        layer = model.model.layers[0].self_attn
        q = torch.zeros(1, 4, 3, 16)
        context_parallel_attention(layer, q, q[:, :2], q[:, :2], None)
    # after each refusal the model runs as before, in one process
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def _check_decode_and_refusals(rank: int) -> None:
    _check_decode(rank, ("hip", "blocktopk", "streaming", "dense"))
    _check_refusals(rank)


def test_decode_after_gathering_the_cache_equals_one_process_and_refusals_are_clear():
    # One pair of processes for both checks (each start costs seconds).
    run_two_ranks(_check_decode_and_refusals)
