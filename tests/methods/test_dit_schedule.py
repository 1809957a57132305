"""The DiT foundation: denoising steps counted from the transformer's input, schedules as config fields."""

from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("diffusers")

import patchattn
from patchattn.adapters.diffusers import StepCounter
from patchattn.methods._dit import DiTCall, DiTScheduleConfig, dense_sdpa, dit_call, scheduled_dense

from dit_cases import run, tiny


@dataclass(kw_only=True)
class ScheduleProbeConfig(DiTScheduleConfig):
    """Dense attention that records each call's DiTCall and whether the schedule runs it dense."""


CALLS: list = []


@patchattn.register_method("test_dit_schedule_probe", config=ScheduleProbeConfig, category="other",
                           families=("dit",), paper="test probe")
def schedule_probe(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, is_causal=False,
                   cross_attention=False, enable_gqa=False, **kwargs):
    """Dense, recording the call."""
    state = module.patchattn
    call = dit_call(state, query, cross_attention)
    CALLS.append((call, scheduled_dense(state.config, call)))
    return dense_sdpa(query, key, value, attention_mask, scaling=scaling, dropout=dropout, enable_gqa=enable_gqa), None


def test_step_counter_follows_decreasing_timesteps_and_restarts():
    counter = StepCounter()
    seen = [counter.advance(torch.tensor([t, t])) for t in (0.9, 0.9, 0.5, 0.2, 0.95, 0.4)]
    assert seen == [0, 0, 1, 2, 0, 1]  # a repeated timestep is the same step (CFG as two forwards); higher: restart


def test_step_counter_uses_the_scheduler_index_when_known():
    counter = StepCounter()
    schedule = torch.tensor([999.0, 749.0, 499.0, 249.0])
    assert counter.advance(torch.tensor(499.0), schedule) == 2
    assert counter.advance(torch.tensor(0.249), schedule) == 3  # FLUX passes t / 1000
    assert counter.advance(torch.tensor(999.0), schedule) == 0


def _call(step, num_steps=None, layer=0):
    return DiTCall("self", (1, 2, 2), (0, 4), (), layer, step, num_steps, None)


def test_scheduled_dense_reads_steps_and_layers():
    config = ScheduleProbeConfig(dense_first_steps=2, dense_last_steps=1, dense_layers=[3])
    assert [scheduled_dense(config, _call(s, 5)) for s in range(5)] == [True, True, False, False, True]
    assert scheduled_dense(config, _call(3, 5, layer=3))
    assert not scheduled_dense(ScheduleProbeConfig(), _call(None))


def test_dense_last_steps_without_a_step_count_warns_and_runs_the_method():
    with pytest.warns(UserWarning, match="number of denoising steps is unknown"):
        assert not scheduled_dense(ScheduleProbeConfig(dense_last_steps=2), _call(7))


def test_patched_dit_sees_steps_layers_and_the_set_step_count():
    model, inputs = tiny("flux")
    reference = run(model, inputs)
    patchattn.patch(model, "test_dit_schedule_probe", dense_first_steps=1)
    CALLS.clear()
    for t in (0.8, 0.8, 0.3):
        run(model, dict(inputs, timestep=torch.full_like(inputs["timestep"], t)))
    n_modules = len(CALLS) // 3
    steps = [call.step for call, _ in CALLS]
    assert steps == [0] * 2 * n_modules + [1] * n_modules
    assert [dense for _, dense in CALLS] == [True] * 2 * n_modules + [False] * n_modules
    assert [call.layer for call, _ in CALLS[:n_modules]] == list(range(n_modules))
    assert CALLS[0][0].num_steps is None
    patchattn.set_denoising_steps(model, 3)
    run(model, inputs)
    assert CALLS[-1][0].num_steps == 3
    with pytest.raises(ValueError, match="positive int"):
        patchattn.set_denoising_steps(model, 0)
    patchattn.unpatch(model)
    assert torch.equal(run(model, inputs), reference)


def test_dense_layers_beyond_the_model_are_refused():
    model, _ = tiny("flux")
    with pytest.raises(ValueError, match="dense_layers"):
        patchattn.patch(model, "test_dit_schedule_probe", dense_layers=[99])
    assert patchattn.get_handle(model) is None


def test_set_denoising_steps_needs_a_patched_dit():
    model, _ = tiny("flux")
    with pytest.raises(ValueError, match="patched by patchattn"):
        patchattn.set_denoising_steps(model, 4)


def test_key_padding_ends_reads_prefix_masks_and_refuses_others():
    from patchattn.methods._dit import key_padding_ends

    bool_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)[:, None, None]
    assert key_padding_ends(bool_mask, 2, 4).tolist() == [3, 4]
    additive = torch.zeros(2, 1, 1, 4)
    additive[0, ..., 2:] = -10000.0
    assert key_padding_ends(additive, 2, 4).tolist() == [2, 4]
    assert key_padding_ends(None, 2, 4) is None
    with pytest.raises(NotImplementedError, match="prefix"):
        key_padding_ends(torch.tensor([[1, 0, 1, 1]], dtype=torch.bool)[:, None, None], 1, 4)
    with pytest.raises(NotImplementedError, match=r"\[B, 1, 1, Tk\]"):
        key_padding_ends(torch.ones(1, 1, 4, 4, dtype=torch.bool), 1, 4)
    with pytest.raises(NotImplementedError, match="prefix"):
        key_padding_ends(torch.full((1, 1, 1, 4), -0.5), 1, 4)  # a bias, not a padding mask
