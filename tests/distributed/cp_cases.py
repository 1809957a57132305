"""Two CPU processes (gloo) for the context-parallel tests: start them, and what each rank checks.

Each rank builds the same tiny Llama (GQA: 4 query heads, 2 KV heads), patches it, runs the one-process prefill
on the whole prompt as the oracle, then the context-parallel prefill, and compares its own tokens' logits (fp32).
"""

from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
PROMPT = 16 * 8 + 5  # not a multiple of the block size: the last block is partial
BLOCK = 16
# Settings that make each method sparse on a 9-block prompt (their defaults read every block at this length).
METHODS = {
    "dense": {},
    "hip": dict(block_size=BLOCK, top_k=2, sink_blocks=1, local_blocks=1),
    "blocktopk": dict(block_size=BLOCK, top_k=2, sink_blocks=1, local_blocks=1, mass=1.0),
    "streaming": dict(block_size=BLOCK, sink_tokens=4, window=32),
    "power": dict(block_size=BLOCK, sink_blocks=1, local_blocks=1),
    "s2": dict(block_size=BLOCK, local_blocks=2),
    "moa": dict(block_size=BLOCK),  # its uniform plan: windows that scale with the prompt's length
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(fn, *args) -> None:
    """``fn(rank, *args)`` in two spawned processes joined by a gloo group; a failure on a rank fails the call."""
    port = free_port()
    mp.spawn(_entry, args=(port, fn, args), nprocs=WORLD, join=True)


def _entry(rank: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def prompt(batch: int = 2, tokens: int = PROMPT) -> torch.Tensor:
    return torch.randint(3, 120, (batch, tokens), generator=torch.Generator().manual_seed(1))


def patched_tiny_llama(method: str, **overrides):
    import patchattn
    from patchattn.testing import tiny_model

    model = tiny_model("llama", seed=0)
    patchattn.patch(model, method, **{**METHODS[method], "backend": "torch", **overrides})
    return model


def cache_of(output):
    """The KV cache of a forward's output (transformers renamed ``past_key_values`` to ``cache``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_kwarg(model, cache) -> dict:
    """``{name: cache}`` under the name this transformers' forward and generate take it."""
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


ATOL = 2e-5


def check_prefill(rank: int, methods: tuple, balance: str, exchange: str, overrides: dict) -> None:
    """On one rank: for each method, its logits and the gathered logits equal the one-process prefill's (fp32)."""
    import patchattn
    from patchattn.distributed import context_parallel
    from patchattn.testing import tiny_model

    ids = prompt()
    dense_model = tiny_model("llama", seed=0)
    with torch.no_grad():
        dense = dense_model(ids).logits
    for method in methods:
        model = patched_tiny_llama(method, **overrides.get(method, {}))
        with torch.no_grad():
            oracle = model(ids).logits
            cp = context_parallel(model, balance=balance, exchange=exchange)
            local = cp(ids).logits
            whole = cp.gather(local)
        if method != "dense":  # the method is sparse here: a wrong selection would change the logits
            assert (oracle - dense).abs().max() > 1e-3, f"{method} reads every block at this length"
        positions = cp.positions
        assert local.shape[1] == positions.numel() < ids.shape[1]
        err = (local - oracle[:, positions]).abs().max().item()
        assert err < ATOL, f"{method} ({balance}, {exchange}) rank {rank}: max |cp - one process| = {err:.2e}"
        assert torch.allclose(whole, oracle, atol=ATOL), f"{method}: gathered logits differ"
        patchattn.unpatch(model)
        with torch.no_grad():  # the prefill left the model as it was
            assert torch.equal(model(ids).logits, dense)


LEFT = (4, 38)  # pads per row: real lengths 129 and 95 (odd, partial last blocks), both starting mid-block


def padded_prompt(pads=LEFT, right: bool = False):
    """(input_ids with pad id 0, attention_mask) of batch ``len(pads)``."""
    ids = prompt(len(pads))
    real = torch.stack([torch.arange(PROMPT) >= p for p in pads])
    if right:
        real = real.flip(-1)
    return ids.masked_fill(~real, 0), real.long()


def assert_real_close(got, want, mask, what: str) -> None:
    real = mask.bool()
    err = (got - want).abs()[real].max().item()
    assert err < ATOL, f"{what}: max |cp - one process| on real tokens = {err:.2e}"


def generate_position_ids(mask):
    """The rotary positions ``generate`` gives a padded prompt."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
