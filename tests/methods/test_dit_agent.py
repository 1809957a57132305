"""agent on DiTs: one call against an eager two-softmax oracle (loops for the pooling, explicit softmaxes), text rows
dense, key padding; the dense-equivalent setting and the AgentSD schedule on every tiny DiT family; unpatch."""

import math
import warnings

import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("diffusers")

from dit_cases import CASES, FAMILIES, run, tiny

import patchattn
from patchattn.methods.agent import AgentConfig, agent_grid_for
from patchattn.registry import get_spec
from patchattn.state import PatchContext, PatchState, TokenLayout


def _module(config, grid, image, text, step=None, num_steps=None):
    layout = TokenLayout(text_slices=text, grid=grid, image_slice=image)
    context = PatchContext(family="test", kind="dit", layout=layout, extras={"step": step, "num_steps": num_steps})
    module = torch.nn.Module()
    module.patchattn = PatchState(config, 0, "dit", context)
    return module


def _bins(extent, out):
    """adaptive average pooling's bins: [floor(i*n/m), ceil((i+1)*n/m))."""
    return [(i * extent // out, -(-(i + 1) * extent // out)) for i in range(out)]


def oracle(q, k, v, grid, agent_grid, image, text, scale, k_scale2, k_shortcut, keep=None):
    """Eager agent attention, one (batch, head) at a time: pooled agents by explicit bins, two explicit softmaxes."""
    b, h, t, d = q.shape
    out = torch.empty_like(q)
    f_bins, h_bins, w_bins = (_bins(g, a) for g, a in zip(grid, agent_grid))
    for bi in range(b):
        visible = torch.ones(t, dtype=torch.bool) if keep is None else keep[bi]
        for hi in range(h):
            qi = q[bi, hi, image[0]:image[1]].reshape(*grid, d)
            agents = torch.stack([qi[f0:f1, y0:y1, x0:x1].reshape(-1, d).mean(0)
                                  for f0, f1 in f_bins for y0, y1 in h_bins for x0, x1 in w_bins])
            logits = agents @ k[bi, hi].T * scale
            logits[:, ~visible] = float("-inf")
            agent_values = torch.softmax(logits, -1) @ v[bi, hi]
            broadcast = torch.softmax(q[bi, hi, image[0]:image[1]] @ agents.T * scale ** k_scale2, -1)
            out[bi, hi, image[0]:image[1]] = broadcast @ agent_values + k_shortcut * v[bi, hi, image[0]:image[1]]
            for lo, hi_ in text:  # text rows: plain softmax attention over every visible key
                logits = q[bi, hi, lo:hi_] @ k[bi, hi].T * scale
                logits[:, ~visible] = float("-inf")
                out[bi, hi, lo:hi_] = torch.softmax(logits, -1) @ v[bi, hi]
    return out.transpose(1, 2)


CALLS = [
    # grid, n_text, text first, settings
    ((1, 6, 8), 0, None, {}),  # the AgentSD default: one agent per 4x4 cell
    ((1, 7, 5), 4, True, {"pool": [2, 3]}),  # uneven bins on both axes, text first (FLUX, CogVideoX)
    ((3, 4, 6), 5, False, {"pool": [2, 2, 3], "k_scale2": 1.0, "k_shortcut": 0.0}),  # video, text last (SD3)
    ((2, 5, 5), 0, None, {"agent_grid": [2, 2]}),
]


def _layout(grid, n_text, text_first):
    n = math.prod(grid)
    if not n_text:
        return (0, n), ()
    return ((n_text, n_text + n), ((0, n_text),)) if text_first else ((0, n), ((n, n + n_text),))


@pytest.mark.parametrize("grid, n_text, text_first, settings", CALLS)
@pytest.mark.parametrize("masked", [False, True])
def test_agent_equals_the_eager_two_softmax_oracle(grid, n_text, text_first, settings, masked):
    config = AgentConfig(agent_until=1.0, **settings)
    image, text = _layout(grid, n_text, text_first)
    length = math.prod(grid) + n_text
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    keep = None
    mask = None
    if masked:  # a key-padding mask (HunyuanVideo's padded text): row 0 hides its last 3 keys
        keep = torch.ones(2, length, dtype=torch.bool)
        keep[0, -3:] = False
        mask = keep[:, None, None, :]
    module = _module(config, grid, image, text)
    out, _ = get_spec("agent").forward(module, q, k, v, mask, scaling=0.4)
    agent_grid = agent_grid_for(config, grid)
    assert 2 * math.prod(agent_grid) < math.prod(grid)  # the agent path ran, not the dense fallback
    expected = oracle(q, k, v, grid, agent_grid, image, text, 0.4, config.k_scale2, config.k_shortcut, keep)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    assert module.patchattn.stats["agents"] == math.prod(agent_grid)


def test_the_default_agent_count_is_agentsd_one_per_4x4_cell():
    assert agent_grid_for(AgentConfig(), (1, 64, 64)) == (1, 16, 16)  # FLUX 1024²: 256 agents for 4096 tokens
    assert agent_grid_for(AgentConfig(), (13, 30, 45)) == (13, 8, 12)  # video: per frame
    assert agent_grid_for(AgentConfig(agent_grid=[7, 7]), (1, 64, 64)) == (1, 7, 7)  # the ViT paper's 49
    with pytest.raises(ValueError, match="at most 3"):
        AgentConfig(pool=[1, 2, 3, 4])


def test_half_the_tokens_or_more_as_agents_runs_dense():
    """AgentSD's rule (agents only when fewer than half the tokens) is what makes pool=1 dense, exactly."""
    grid, image = (1, 4, 4), (0, 16)
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    for settings in ({"pool": 1}, {"agent_grid": [3, 3]}):  # 16 and 9 agents for 16 tokens
        out, _ = get_spec("agent").forward(_module(AgentConfig(**settings), grid, image, ()), q, k, v, None)
        assert torch.equal(out, expected)
    out, _ = get_spec("agent").forward(_module(AgentConfig(agent_grid=[2, 3]), grid, image, ()), q, k, v, None)
    assert not torch.allclose(out, expected)  # 6 agents: the agent path


def test_a_query_dependent_mask_is_refused():
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    with pytest.raises(NotImplementedError, match="key padding"):
        get_spec("agent").forward(_module(AgentConfig(agent_until=1.0), (1, 4, 4), (0, 16), ()), q, k, v, mask)


@pytest.mark.parametrize("step, num_steps, agents", [(0, 10, True), (3, 10, True), (4, 10, False), (9, 10, False),
                                                      (7, None, True)])
def test_agent_steps_are_the_first_40_percent(step, num_steps, agents):
    grid, image = (1, 8, 8), (0, 64)
    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    module = _module(AgentConfig(), grid, image, (), step=step, num_steps=num_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if num_steps is None else "error")
        out, _ = get_spec("agent").forward(module, q, k, v, None)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    assert torch.equal(out, dense) != agents


# ---- whole tiny DiTs -------------------------------------------------------------------------------------------
SMALL = {"pool": 2, "agent_until": 1.0}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_runs_dense_equivalent_is_exact_and_unpatch_restores(family):
    model, inputs = tiny(family)
    reference = run(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with patchattn.patched(model, "agent", **AgentConfig.DENSE_EQUIVALENT):
            assert torch.equal(run(model, inputs), reference)
    patchattn.patch(model, "agent", **SMALL)
    out = run(model, inputs)
    states = [m.patchattn for m in model.modules() if isinstance(getattr(m, "patchattn", None), PatchState)]
    agent_calls = [s for s in states if "agents" in s.stats]
    assert torch.isfinite(out).all() and not torch.allclose(out, reference, atol=1e-4)
    assert agent_calls and ("cross" in CASES[family].roles.values()) == (len(agent_calls) < len(states))
    patchattn.unpatch(model)
    assert torch.equal(run(model, inputs), reference)


def test_the_schedule_runs_dense_after_the_agent_steps():
    model, inputs = tiny("flux")
    reference = run(model, inputs)
    with patchattn.patched(model, "agent", pool=2):
        patchattn.set_denoising_steps(model, 5)
        first = run(model, inputs)  # step 0 of 5: agents
        run(model, dict(inputs, timestep=inputs["timestep"] * 0.9))  # step 1: agents
        later = run(model, dict(inputs, timestep=inputs["timestep"] * 0.5))  # step 2 >= 0.4 * 5: dense
    assert not torch.allclose(first, reference, atol=1e-4)
    assert torch.equal(later, run(model, dict(inputs, timestep=inputs["timestep"] * 0.5)))
    with patchattn.patched(model, "agent", pool=2, agent_until=1.0, dense_layers=[0]):
        partly = run(model, inputs)
    states_differ = not torch.allclose(partly, first, atol=1e-6)
    assert states_differ  # layer 0 dense changes the output


# ---- memory: the two small attentions stay on the fused kernels ------------------------------------------------
class LargestOutput(TorchDispatchMode):
    """Records every aten op of a forward and the largest tensor any of them returns (in elements)."""

    def __init__(self):
        super().__init__()
        self.ops, self.largest = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest] + [t.numel() for t in tensors])
        return out


def _video_call(masked: bool, dtype=torch.float32):
    """A joint video call (text last, HunyuanVideo's order) where the agents outnumber the head dimension, so any
    score matrix (queries x agents, agents x keys, let alone queries x keys) is larger than q itself."""
    grid, n_text = (2, 16, 16), 16
    image, text = _layout(grid, n_text, text_first=False)
    length = math.prod(grid) + n_text
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, length, 16, generator=gen, dtype=dtype) for _ in range(3))
    mask = None
    if masked:  # key padding built key-major, as a model may: its last dimension is strided
        keep = torch.ones(length, 2, dtype=torch.bool)
        keep[-5:] = False
        mask = keep[None, None, None, :, 0]
        assert mask.stride(-1) == 2
    config = AgentConfig(pool=[1, 2, 2], agent_until=1.0)  # 128 agents for 512 image tokens, head dim 16
    assert math.prod(agent_grid_for(config, grid)) == 128
    return _module(config, grid, image, text), q, k, v, mask


@pytest.mark.parametrize("masked", [False, True])
def test_no_tensor_larger_than_the_queries_is_built(masked):
    """The fused kernels keep the [a, T] and [T, a] scores in tiles; the math path (SDPA's fallback) would return them
    from a bmm. Nothing the forward builds may be larger than q ([B, H, T, D]): memory O(T·D), not O(T·a)."""
    module, q, k, v, mask = _video_call(masked)
    with LargestOutput() as seen:
        get_spec("agent").forward(module, q, k, v, mask, scaling=0.25)
    assert seen.largest <= q.numel(), seen.largest
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in seen.ops
    assert not [op for op in seen.ops if "bmm" in op or "softmax" in op]


def test_the_recorder_sees_the_math_path_of_strided_agents():
    """The recorder's negative control: the agents as the pooling's view (last-dimension stride a, as before the
    fix) send SDPA to the math path, whose scores are larger than q."""
    module, q, k, v, _ = _video_call(False)
    image = q[:, :, :512]
    agents = torch.nn.functional.adaptive_avg_pool3d(image.reshape(2, 2, 16, 16, 16).permute(0, 4, 1, 2, 3),
                                                     (2, 8, 8)).permute(0, 2, 3, 4, 1).reshape(1, 2, 128, 16)
    assert agents.stride(-1) != 1
    with LargestOutput() as seen:
        torch.nn.functional.scaled_dot_product_attention(agents, k, v)
    assert seen.largest >= 128 * q.shape[2] * 2 > q.numel()


def fused_kernel_violations(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                            enable_gqa=False):
    """What keeps an SDPA call off every fused CUDA kernel (flash, memory-efficient, cuDNN), after PyTorch's
    ``sdp_utils.cpp`` (``check_last_dim_stride_equals_1_dense``, ``check_tensor_dtype``,
    ``check_batch_size_and_num_heads_dense``, ``check_head_dim_size_*``), plus this method's own rule that no mask
    has a query dimension (a [Tq, Tk] mask is what the agents avoid).  The memory-efficient kernel pads a mask
    whose last dimension is not a multiple of 16 itself (``pad_bias``), so alignment is not checked."""
    problems = []
    tensors = {"query": query, "key": key, "value": value}
    problems += [f"{name} last-dim stride {t.stride(-1)}" for name, t in tensors.items() if t.stride(-1) != 1]
    problems += [f"{name} is {t.ndim}-D" for name, t in tensors.items() if t.ndim != 4]
    if len({t.dtype for t in tensors.values()}) > 1:
        problems.append("q/k/v dtypes differ")
    if enable_gqa or key.shape[:2] != query.shape[:2] or value.shape[:2] != query.shape[:2]:
        problems.append("batch or head counts differ")
    if not query.shape[-1] == key.shape[-1] == value.shape[-1] or query.shape[-1] > 256:
        problems.append(f"head dims {query.shape[-1]}, {key.shape[-1]}, {value.shape[-1]}")
    if dropout_p:
        problems.append("dropout")
    if attn_mask is not None:
        if attn_mask.stride(-1) != 1:
            problems.append(f"mask last-dim stride {attn_mask.stride(-1)}")
        if attn_mask.dtype not in (torch.bool, query.dtype):
            problems.append(f"mask dtype {attn_mask.dtype}")
        if attn_mask.shape[-2] != 1:
            problems.append(f"mask of shape {tuple(attn_mask.shape)} has a query dimension")
        if is_causal:
            problems.append("mask with is_causal")
    return problems


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_every_sdpa_call_meets_the_fused_kernels_constraints(monkeypatch, mask_kind):
    module, q, k, v, mask = _video_call(mask_kind is not None, dtype=torch.bfloat16)
    if mask_kind == "additive":  # 0 / -inf in the query dtype, still strided
        additive = torch.zeros(q.shape[2], 2, dtype=q.dtype).masked_fill(~mask[0, 0, 0, :, None], float("-inf"))
        mask = additive[None, None, None, :, 0]
        assert mask.stride(-1) == 2
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def recording_sdpa(*args, **kwargs):
        calls.append(fused_kernel_violations(*args, **kwargs))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    get_spec("agent").forward(module, q, k, v, mask, scaling=0.25)
    assert len(calls) == 3 and calls == [[], [], []]  # agents over keys, queries over agents, the text rows
