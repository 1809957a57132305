"""``composite`` (EE-MLLM composite attention) on tiny LVLMs, against an independent masked-SDPA oracle.

The oracle is a plain transformers attention function (registered with transformers, not with patchattn) that runs
SDPA with the model's own mask minus every visual x visual pair off the diagonal, the image tokens read from the
prompt's ``input_ids``.  There is no dense-equivalent setting to test: removing visual x visual attention is the
method (every setting changes the outputs of a prompt with an image).
"""

import pytest
import torch
import torch.nn.functional as F
from lvlm_cases import family_inputs
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import patchattn
from patchattn.masks.composite import composite_block_lists, composite_token_mask
from patchattn.testing import LVLM_FAMILIES, left_pad, max_abs_diff, tiny_inputs, tiny_model

TOL = 2e-5
ORACLE = "composite_oracle_test"
IMAGE = {"keys": None, "sees_text": False}  # the oracle's image tokens (bool [B, prompt length]) and variant


def _oracle(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
    image = torch.zeros(batch, k_len, dtype=torch.bool)
    if q_len > 1:  # a prefill; a decoded token is text, its row is the model's own (a sliding cache may be short)
        image[:, : IMAGE["keys"].shape[1]] = IMAGE["keys"]
    if attention_mask is None:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)[None, None]
    else:
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1e4
    q_image = image[:, k_len - q_len:]
    same = torch.eye(k_len, dtype=torch.bool)[k_len - q_len:]
    # A visual query drops every other visual key, and (the paper's rule) every text key too.
    hidden_keys = image[:, None, :] if IMAGE["sees_text"] else torch.ones_like(image)[:, None, :]
    mask = allowed & ~(q_image[:, :, None] & hidden_keys & ~same)[:, None]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2), None


AttentionInterface.register(ORACLE, _oracle)
AttentionMaskInterface.register(ORACLE, sdpa_mask)


def _set_text_impl(model, name):
    model.config.get_text_config()._attn_implementation_internal = name


def _two_image_llava_inputs(model, batch=2):
    """Two images per prompt: text, image, text, image, text (16 image tokens each)."""
    gen = torch.Generator().manual_seed(3)
    token = model.config.image_token_id
    text = lambda n: torch.randint(3, 100, (batch, n), generator=gen)
    img = torch.full((batch, 16), token)
    ids = torch.cat([text(3), img, text(5), img, text(6)], dim=1)
    return {"input_ids": ids, "pixel_values": torch.randn(batch * 2, 3, 16, 16, generator=gen)}


def _inputs(family):
    model = tiny_model(family)
    inputs = _two_image_llava_inputs(model) if family == "llava" else family_inputs(model, family)
    return model, left_pad(inputs, [0, 3], pad_id=1)


def _oracle_logits(model, inputs, sees_text=False):
    IMAGE["keys"] = inputs["input_ids"] == model.config.image_token_id
    IMAGE["sees_text"] = sees_text
    _set_text_impl(model, ORACLE)
    try:
        return model(**inputs).logits
    finally:
        _set_text_impl(model, "sdpa")


@pytest.mark.parametrize("family", LVLM_FAMILIES)
@pytest.mark.parametrize("visual_sees_text", [False, True])
def test_matches_masked_sdpa_oracle_padded_batch(family, visual_sees_text):
    model, inputs = _inputs(family)
    with torch.no_grad():
        want = _oracle_logits(model, inputs, visual_sees_text)
        dense = model(**inputs).logits
        with patchattn.patched(model, "composite", block=16, backend="torch", visual_sees_text=visual_sees_text):
            got = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert max_abs_diff(got[valid], want[valid]) <= TOL
    assert max_abs_diff(got[valid], dense[valid]) > 1e-3, "an image prompt must change"


def test_visual_sees_text_variant_against_its_own_oracle():
    image = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    mask = composite_token_mask(image, 10, visual_sees_text=True)[0]
    for i in range(10):
        for j in range(10):
            want = j <= i and (not image[0, i] or i == j or not image[0, j])
            assert bool(mask[i, j]) == want, (i, j)


def test_visual_blocks_read_only_their_diagonal_tile():
    # 16 text, 64 image, 16 text tokens; block 16: the 4 image query blocks read one (identity) tile each.
    image = torch.zeros(1, 96, dtype=torch.bool)
    image[:, 16:80] = True
    idx, counts, ids, tiles, tile_density = composite_block_lists(composite_token_mask(image, 96), 16)
    assert counts[0, 0, 1:5].tolist() == [1, 1, 1, 1]
    assert idx[0, 0, 1:5, 0].tolist() == [1, 2, 3, 4]
    assert torch.equal(tiles[ids[0, 0, 1, 0]], torch.eye(16, dtype=torch.bool))
    assert counts[0, 0, 5].item() == 6  # the last text block reads every block (causal, diagonal partial)
    assert tile_density < 0.5 * (6 * 7 / 2) / 36 * 2  # well below the causal share of tiles


def test_perturbing_one_image_token_moves_no_other_image_token():
    model = tiny_model("llava")
    inputs = _two_image_llava_inputs(model, batch=1)
    image = (inputs["input_ids"] == model.config.image_token_id)[0]
    nth = 5  # the 6th image token of the prompt (first image)
    target = int(image.nonzero()[nth])

    def nudge(_module, _args, output):  # the projector's output: [images, tokens per image, hidden]
        output = output.clone()
        output.view(-1, output.shape[-1])[nth] += 0.5
        return output

    def hidden(patched_with):
        with torch.no_grad():
            if patched_with is None:
                return model(**inputs, output_hidden_states=True).hidden_states
            with patchattn.patched(model, patched_with, block=16, backend="torch"):
                return model(**inputs, output_hidden_states=True).hidden_states

    for method in ("composite", None):
        base = hidden(method)
        handle = model.model.multi_modal_projector.register_forward_hook(nudge)
        try:
            moved = hidden(method)
        finally:
            handle.remove()
        others = image.clone()
        others[target] = False
        later_text = ~image & (torch.arange(image.numel()) > target)
        for layer, (a, b) in enumerate(zip(base, moved)):
            image_change = (a[0, others] - b[0, others]).abs().max().item()
            if method == "composite":
                assert image_change <= 1e-6, f"layer {layer}: another image token moved by {image_change}"
            assert (a[0, target] - b[0, target]).abs().max() > 1e-3
            if layer > 0:
                assert (a[0, later_text] - b[0, later_text]).abs().max() > 1e-4, "text must see the image"
        if method is None:  # the control: dense attention spreads the change over the image
            assert image_change > 1e-4


@pytest.mark.parametrize("family", LVLM_FAMILIES)
def test_decode_with_cache_matches_the_oracle(family):
    model, inputs = _inputs(family)
    with torch.no_grad():
        IMAGE["keys"] = inputs["input_ids"] == model.config.image_token_id
        IMAGE["sees_text"] = False
        _set_text_impl(model, ORACLE)
        want = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=1)
        _set_text_impl(model, "sdpa")
        with patchattn.patched(model, "composite", block=16, backend="torch"):
            got = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert torch.equal(got, want)


def test_text_only_prompt_is_dense_and_unpatch_restores():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", with_image=False)
    with torch.no_grad():
        reference = model(**inputs).logits
        with patchattn.patched(model, "composite"):
            assert torch.equal(model(**inputs).logits, reference)
        image_inputs = tiny_inputs(model, "llava")
        before = model(**image_inputs).logits
        with patchattn.patched(model, "composite", backend="torch"):
            model(**image_inputs)
        assert torch.equal(model(**image_inputs).logits, before)


def test_bad_settings_and_targets_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        patchattn.get_config("composite", block=48)
    with pytest.raises(ValueError, match="lvlm"):
        patchattn.patch(tiny_model("llama"), "composite")
    model = tiny_model("llava")
    with patchattn.patched(model, "composite", targets="vision"), pytest.raises(NotImplementedError,
                                                                                  match="causal-self"):
        model(**tiny_inputs(model, "llava"))


def test_chunked_prefill_over_a_cache_is_refused():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", batch=1)
    with torch.no_grad(), patchattn.patched(model, "composite", backend="torch"):
        out = model(**inputs, use_cache=True)
        more = torch.randint(3, 100, (1, 3))
        with pytest.raises(NotImplementedError, match="chunked prefill"):
            model(input_ids=torch.cat([inputs["input_ids"][:, :0], more], 1), past_key_values=out.past_key_values)


def test_per_row_lists_on_the_triton_engine_forward_and_gradients(triton_target):
    """The engine path the method takes on a GPU (interpreted on CPU): two rows with different image spans."""
    from patchattn.kernels.blocksparse import block_sparse_attention

    gen = torch.Generator().manual_seed(0)
    image = torch.zeros(2, 40, dtype=torch.bool)
    image[0, 3:19], image[0, 25:33], image[1, 10:30] = True, True, True
    mask = composite_token_mask(image, 40)
    idx, counts, ids, tiles, _ = composite_block_lists(mask, 16)
    q, k, v = (torch.randn(2, 2, 40, 16, generator=gen).to(triton_target).requires_grad_() for _ in range(3))
    args = [t.to(triton_target) for t in (idx, counts)]
    out = block_sparse_attention(q, k, v, *args, block_q=16, block_k=16, causal=False,
                                 tile_masks=tiles.to(triton_target), tile_mask_ids=ids.to(triton_target),
                                 backend="triton")
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None].to(triton_target))
    assert max_abs_diff(out, want) <= 1e-4
    grad = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, (q, k, v), grad)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    assert all(max_abs_diff(a, b) <= 1e-4 for a, b in zip(got_grads, want_grads))
