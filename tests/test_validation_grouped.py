"""longlora / sinklora at lengths whose groups do not fall on a Triton block (issue 19, item 7).

The block of the grouped attentions is the largest divisor of the segment unit; at T=70 (one group of 70 tokens)
that is 2, which the Triton kernel does not take.  Those lengths now run on a padded token layout on which every
segment starts on a kernel block; the torch backend and the papers' references give the same outputs and gradients.
"""

import pytest
import torch

import patchattn
from patchattn.methods import longlora, sinklora
from patchattn.methods._shared import KERNEL_BLOCKS, PieceLayout, grouped_blocks
from patchattn.state import PatchContext, PatchState
from patchattn.testing import max_abs_diff, tiny_model


class _Module(torch.nn.Module):
    """Stands in for a transformers attention module (training flag + patch state)."""

    def __init__(self, config):
        super().__init__()
        self.patchattn = PatchState(config, 0, "text", PatchContext())
        self.is_causal = True


def _qkv(seq, dim=16, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, seq, dim, generator=gen)
    k, v = torch.randn(1, 2, seq, dim, generator=gen), torch.randn(1, 2, seq, dim, generator=gen)
    return [t.to(device).requires_grad_() for t in (q, k, v)]


def _run(method, backend, seq, fields, device="cpu"):
    q, k, v = _qkv(seq, device=device)
    module = _Module(patchattn.get_config(method, backend=backend, **fields)).train()
    forward = longlora.longlora_attention if method == "longlora" else sinklora.sinklora_attention
    out = forward(module, q, k, v, None, scaling=0.25)[0].transpose(1, 2)
    torch.manual_seed(3)
    grads = torch.autograd.grad((out * torch.randn(out.shape).to(device)).sum(), (q, k, v))
    return out, grads, (q, k, v)


def _reference(method, seq, fields, inputs):
    q, k, v = inputs
    if method == "longlora":
        group = fields.get("group_size") or int(seq * fields.get("group_size_ratio", 0.25))
        out = longlora.s2_attention_reference(q, k, v, group, shift=fields.get("shift", True), scale=0.25)
    else:
        group = fields.get("group_size") or int(seq * fields.get("group_size_ratio", 0.25))
        out = sinklora.sf_attention_reference(q, k, v, group, fields.get("sink_tokens", 4), scale=0.25)
    torch.manual_seed(3)
    return out, torch.autograd.grad((out * torch.randn(out.shape)).sum(), (q, k, v))


# (method, length, fields): the two cases, and a shifted longlora whose half group (13) is odd.
CASES = [
    ("longlora", 70, dict(longlora.LongLoRAConfig.DENSE_EQUIVALENT)),
    ("sinklora", 100, {}),  # defaults: group 25 tokens, 4 sinks
    ("longlora", 100, {"group_size": 26}),
]


@pytest.mark.parametrize("method,seq,fields", CASES, ids=[f"{m}-{t}" for m, t, _ in CASES])
def test_torch_backend_matches_the_reference_off_block_lengths(method, seq, fields):
    out, grads, inputs = _run(method, "torch", seq, fields)
    ref, ref_grads = _reference(method, seq, fields, inputs)
    assert max_abs_diff(out, ref) < 1e-5
    assert all(max_abs_diff(a, b) < 1e-5 for a, b in zip(grads, ref_grads, strict=True))


@pytest.mark.parametrize("method,seq,fields", CASES[:2], ids=[f"{m}-{t}" for m, t, _ in CASES[:2]])
def test_triton_runs_off_block_lengths_like_the_torch_backend(method, seq, fields, triton_target):
    out, grads, _ = _run(method, "triton", seq, fields, triton_target)
    want, want_grads, _ = _run(method, "torch", seq, fields, triton_target)
    assert max_abs_diff(out, want) < 1e-4
    assert all(max_abs_diff(a, b) < 1e-4 for a, b in zip(grads, want_grads, strict=True))


def test_a_dense_equivalent_longlora_model_equals_dense_through_triton(triton_target):
    model = tiny_model("llama").to(triton_target)
    ids = torch.randint(3, 100, (1, 70), generator=torch.Generator().manual_seed(0)).to(triton_target)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with patchattn.patched(model, "longlora", backend="triton", **longlora.LongLoRAConfig.DENSE_EQUIVALENT):
            model.train()
            got = model(input_ids=ids).logits
    assert max_abs_diff(got, dense) < 1e-4


def test_block_choice_keeps_aligned_lengths_and_pads_the_others():
    assert grouped_blocks(256, 128, 64) == (64, None)  # boundaries on blocks: as before, no padding
    assert grouped_blocks(96, 48, 16) == (16, None)
    block, layout = grouped_blocks(70, 70, 64)  # gcd 2: not a kernel block
    assert block in KERNEL_BLOCKS and layout == PieceLayout(70, 70, block)
    assert layout.piece % block == 0 and layout.piece - 70 < block
    assert grouped_blocks(1000, 1000, 64)[0] == 64  # 24 padding tokens at 64 vs 8 at 16: within 1/16, the larger
    assert grouped_blocks(70, 70, 16)[0] == 16  # never above block_size


def test_piece_layout_puts_every_piece_on_a_block_and_round_trips():
    layout = PieceLayout(seq_len=30, unit=13, block=16)
    positions = layout.position(torch.arange(30))
    assert positions[[0, 13, 26]].tolist() == [0, 16, 32]  # each piece starts a block
    assert layout.length == 48 and bool((positions.diff() > 0).all())
    assert layout.block_tokens().tolist() == [0, 13, 26]
    x = torch.randn(1, 2, 30, 4)
    assert torch.equal(layout.gather(layout.spread(x)), x)
    bias = layout.key_bias()
    assert bool((bias[positions] == 0).all()) and int(torch.isinf(bias).sum()) == 48 - 30
