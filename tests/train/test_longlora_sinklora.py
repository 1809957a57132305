"""longlora (S²-Attn) and sinklora (SF-Attn + H2O eviction) against plain-torch references of the papers."""

import pytest
import torch

import patchattn
from patchattn.kernels.blocksparse import block_sparse_attention, blocks_from_mask
from patchattn.methods.longlora import aligned_block, s2_attention_reference, s2_block_mask
from patchattn.methods.sinklora import sf_attention_reference
from patchattn.state import PatchContext, PatchState
from patchattn.testing import max_abs_diff, tiny_model


class _Module(torch.nn.Module):
    """Stands in for a transformers attention module (training flag + patch state)."""

    def __init__(self, config):
        super().__init__()
        self.patchattn = PatchState(config, 0, "text", PatchContext())
        self.num_key_value_groups = 2  # _qkv's 4 query heads share 2 kv heads
        self.is_causal = True


def _qkv(batch=2, heads=4, kv_heads=2, seq=128, dim=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    make = lambda h: torch.randn(batch, h, seq, dim, generator=gen, dtype=dtype).requires_grad_()
    return make(heads), make(kv_heads), make(kv_heads)


def _grads(out, tensors):
    # randn(shape), not randn_like: the kernel's output is a strided view, and randn_like follows its strides.
    weight = torch.randn(out.shape, device=out.device, dtype=out.dtype)
    return torch.autograd.grad((out * weight).sum(), tensors)


def _assert_same_grads(out, ref, inputs, tol=1e-4):
    """The same random upstream gradient through both outputs gives the same input gradients."""
    torch.manual_seed(3)
    got = _grads(out, inputs)
    torch.manual_seed(3)
    want = _grads(ref, inputs)
    for a, b in zip(got, want):
        assert max_abs_diff(a, b) < tol


@pytest.mark.parametrize("seq,group", [(128, 32), (96, 32), (128, 64)])
def test_s2_attn_matches_the_papers_algorithm_forward_and_gradients(seq, group):
    from patchattn.methods.longlora import longlora_attention

    q, k, v = _qkv(seq=seq)
    module = _Module(patchattn.get_config("longlora", group_size=group, block_size=64)).train()
    out, _ = longlora_attention(module, q, k, v, None, scaling=16 ** -0.5)
    out = out.transpose(1, 2)
    ref = s2_attention_reference(q, k, v, group, shift=True)
    assert max_abs_diff(out, ref) < 1e-5
    _assert_same_grads(out, ref, (q, k, v))
    assert module.patchattn.stats["density"] < 1.0


def test_shifted_heads_differ_from_unshifted_and_never_see_the_future():
    # A change to the last token may only change outputs at the last token (causality, no wrap-around leak).
    q, k, v = (t.detach() for t in _qkv(seq=64))
    mask = s2_block_mask(64, 32, 16, 4, shift=True)
    idx, cnt = blocks_from_mask(mask)
    run = lambda kk: block_sparse_attention(q, kk, v, idx, cnt, block_q=16, block_k=16, backend="torch")
    k2 = k.clone()
    k2[:, :, -1] += 5.0
    changed = (run(k) - run(k2)).abs().amax(dim=(0, 3)) > 0  # [H, T]
    assert not changed[:, :-1].any()
    assert not torch.equal(mask[0, 0], mask[0, 3]), "the second half of the heads must be shifted"


def test_s2_block_alignment_and_clear_errors():
    assert aligned_block(256, True, 64) == 64
    assert aligned_block(96, True, 64) == 16
    with pytest.raises(ValueError, match="must be even"):
        aligned_block(17, True, 64)
    with pytest.raises(ValueError, match="must be >= 2"):
        from patchattn.methods.longlora import group_size_for

        group_size_for(patchattn.get_config("longlora"), 4)
    with pytest.raises(TypeError, match="did you mean 'group_size'"):
        patchattn.get_config("longlora", group_sise=8)


@pytest.mark.parametrize("method", ["longlora", "sinklora"])
def test_eval_mode_is_dense_exactly_and_training_mode_is_not(method):
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 128))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        with patchattn.patched(model, method, block_size=16):
            assert torch.equal(model(input_ids=ids).logits, reference)
            model.train()
            assert max_abs_diff(model(input_ids=ids).logits, reference) > 1e-3
            model.eval()
        config = patchattn.get_config(method, block_size=16)
        with patchattn.patched(model, config, **type(config).DENSE_EQUIVALENT):
            model.train()
            assert max_abs_diff(model(input_ids=ids).logits, reference) < 1e-5
            model.eval()


@pytest.mark.parametrize("seq,group,sinks", [(128, 32, 4), (96, 48, 20), (128, 64, 0)])
def test_sf_attn_matches_reference_forward_and_gradients(seq, group, sinks):
    from patchattn.methods.sinklora import sinklora_attention

    q, k, v = _qkv(seq=seq)
    module = _Module(patchattn.get_config("sinklora", group_size=group, sink_tokens=sinks, block_size=16)).train()
    out = sinklora_attention(module, q, k, v, None, scaling=16 ** -0.5)[0].transpose(1, 2)
    ref = sf_attention_reference(q, k, v, group, sinks)
    assert max_abs_diff(out, ref) < 1e-5
    _assert_same_grads(out, ref, (q, k, v))


def test_sinklora_config_errors():
    with pytest.raises(ValueError, match="must fit in kv_budget"):
        patchattn.get_config("sinklora", kv_budget=8, kv_recent=6)
    with pytest.raises(ValueError, match="needs kv_budget"):
        patchattn.get_config("sinklora", kv_recent=6)


# ---- H2O -----------------------------------------------------------------------------------------------------------
def _evict(kept: set, mass, newest: int, budget: int, recent: int, sinks: int) -> None:
    protected = {j for j in kept if j < sinks or j > newest - recent}
    while len(kept) > budget:
        kept.discard(min(kept - protected, key=lambda j: (mass[j].item(), j)))


def _h2o_reference(q, k, v, prefill: int, budget: int, recent: int, sinks: int):
    """H2O with Python sets, one (batch, kv head) at a time: dense prefill, cut to budget, then evict per token."""
    batch, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    out = torch.zeros(batch, heads, seq - prefill, dim, dtype=torch.float64)
    for b in range(batch):
        for g in range(kv_heads):
            hs = range(g * group, (g + 1) * group)
            kk, vv = k[b, g].double(), v[b, g].double()
            mass = torch.zeros(seq, dtype=torch.float64)
            for h in hs:
                s = (q[b, h, :prefill].double() @ kk[:prefill].T) * dim ** -0.5
                s = s.masked_fill(torch.ones(prefill, prefill).triu(1).bool(), float("-inf"))
                mass[:prefill] += torch.softmax(s, -1).sum(0)
            kept = set(range(prefill))
            _evict(kept, mass, prefill - 1, budget, recent, sinks)
            for t in range(prefill, seq):
                kept.add(t)
                cols = sorted(kept)
                for h in hs:
                    s = (q[b, h, t].double() @ kk[cols].T) * dim ** -0.5
                    p = torch.softmax(s, -1)
                    out[b, h, t - prefill] = p @ vv[cols]
                    mass[cols] += p
                _evict(kept, mass, t, budget, recent, sinks)
    return out


def test_h2o_eviction_matches_a_set_based_reference():
    from patchattn.methods.sinklora import sinklora_attention

    q, k, v = (t.detach() for t in _qkv(batch=2, seq=40, dim=8))
    # Distinct masses (no ties) so the eviction order is well defined.
    module = _Module(patchattn.get_config("sinklora", kv_budget=12, kv_recent=4, sink_tokens=2)).eval()
    prefill = 24
    sinklora_attention(module, q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], None, scaling=8 ** -0.5)
    assert int(module.patchattn.method_state.h2o.kept.sum(-1).max()) == 12
    outs = []
    for t in range(prefill, 40):
        out, _ = sinklora_attention(module, q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], None,
                                    scaling=8 ** -0.5)
        outs.append(out.transpose(1, 2))
    got = torch.cat(outs, dim=2)
    want = _h2o_reference(q, k, v, prefill, budget=12, recent=4, sinks=2)
    assert max_abs_diff(got.double(), want) < 1e-5
    kept = module.patchattn.method_state.h2o.kept
    assert kept[..., :2].all() and kept[..., -4:].all() and int(kept.sum(-1).max()) == 12


def test_h2o_with_a_budget_larger_than_the_sequence_is_dense_while_generating():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (1, 30))
    dense = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with patchattn.patched(model, "sinklora", kv_budget=1000):
        same = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(dense, same)
    with patchattn.patched(model, "sinklora", kv_budget=8, sink_tokens=2):
        evicting = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert model.model.layers[0].self_attn.patchattn.method_state.h2o.kept.sum(-1).max() == 8
    assert evicting.shape == dense.shape


def _triton_matches_reference(method, device, seq, dim, group, block, tol):
    from patchattn.methods import longlora, sinklora

    q, k, v = (t.detach().to(device).requires_grad_() for t in _qkv(batch=1, seq=seq, dim=dim))
    config = patchattn.get_config(method, group_size=group, block_size=block, backend="triton")
    module = _Module(config).to(device).train()
    forward = longlora.longlora_attention if method == "longlora" else sinklora.sinklora_attention
    out = forward(module, q, k, v, None, scaling=dim ** -0.5)[0].transpose(1, 2)
    if method == "longlora":
        ref = s2_attention_reference(q, k, v, group, shift=True)
    else:
        ref = sf_attention_reference(q, k, v, group, 4)
    assert max_abs_diff(out, ref) < tol
    torch.manual_seed(3)
    got = _grads(out, (q, k, v))
    torch.manual_seed(3)
    want = _grads(ref, (q, k, v))
    for a, b in zip(got, want, strict=True):
        assert max_abs_diff(a, b) < tol * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("method", ["longlora", "sinklora"])
def test_triton_kernel_matches_the_reference_in_the_interpreter(method, triton_interpreter):
    """The training attention through the Triton forward + backward (CPU interpreter) equals the reference."""
    _triton_matches_reference(method, "cpu", seq=64, dim=16, group=32, block=16, tol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["longlora", "sinklora"])
def test_triton_kernel_matches_the_reference_on_gpu(method):
    _triton_matches_reference(method, "cuda", seq=1024, dim=64, group=256, block=64, tol=2e-3)
