"""The NaN/Inf input check under a context-parallel prefill: deferred to the end of each rank's forward (the patched
model's hooks run inside ``ContextParallel.__call__``), so a rank never stops between two collectives; the error
names the layer and tensor, and the next prefill is clean.  NaN is planted in both ranks' chunks (in the same
layer), so the code before the deferred check fails here on its message, not by a hang."""

from __future__ import annotations

import pytest
import torch

from .cp_cases import patched_tiny_llama, prompt, run_two_ranks


def check_planted_nan(rank: int) -> None:
    from patchattn.checks import PENDING_KEY
    from patchattn.distributed import context_parallel
    from patchattn.state import get_state

    model = patched_tiny_llama("dense")
    ids = prompt()
    with torch.no_grad():
        oracle = model(ids).logits

    def poison(_module, _args, output):
        output = output.clone()
        output[0, 1, 3] = float("nan")
        return output

    queued = []

    def count_queued(module, _args):  # layer 1 starts: layer 0 queued its flags, nothing read yet
        queued.append(len(get_state(module.self_attn).context.extras[PENDING_KEY][-1]))

    hook = model.model.layers[0].self_attn.v_proj.register_forward_hook(poison)
    probe = model.model.layers[1].register_forward_pre_hook(count_queued)
    cp = context_parallel(model)
    with torch.no_grad(), pytest.raises(ValueError, match="dense: the attention value of layer 0 contains NaN"):
        cp(ids)
    assert queued == [1]
    hook.remove(), probe.remove()
    with torch.no_grad():
        local = cp(ids).logits
    assert torch.allclose(local, oracle[:, cp.positions], atol=2e-5)


def test_context_parallel_prefill_raises_on_planted_nan_then_runs_clean():
    run_two_ranks(check_planted_nan)
