"""``paint``: token choice from the vision tower and the last-row logit edit, against eager oracles, on tiny LLaVA,
Qwen2-VL, Gemma 3, Idefics3 and SmolVLM (Qwen2.5-VL's windowed tower has its own tests at the end)."""

import itertools

import numpy as np
import pytest
import torch
from lvlm_cases import FAMILIES, Oracle, full_probs, image_mask, oracle_model, padded_inputs
from op_counts import Allocations

import patchattn
from patchattn.methods import _lastrow, paint
from patchattn.testing import max_abs_diff, tiny_inputs, tiny_model

TOL = 2e-5
SETTINGS = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
# qwen2_5_vl: the tiny default tower has one full-attention layer (no penultimate one); tested with 6 layers below
PAINT_FAMILIES = [f for f in FAMILIES if f != "qwen2_5_vl"]
PIXEL_SHUFFLE = ("idefics3", "smolvlm")


def _capture(model):
    return patchattn.get_handle(model) and model.get_submodule(patchattn.get_handle(model).modules[0]).patchattn \
        .context.extras["paint"]


# ---- oracle token choice: the vision tower's attention maps, materialised -----------------------------------------
def _vision_maps(family, inputs, summary_layer=-2):
    """Per image, the (first layer, ``summary_layer``) patch scores, from full eager attention maps."""
    model = tiny_model(family)
    if family == "qwen2_vl":
        return _qwen_maps(model, inputs, summary_layer)
    if family in PIXEL_SHUFFLE:
        return _pixel_shuffle_maps(model, inputs, summary_layer)
    model.config.vision_config._attn_implementation_internal = "eager"
    with torch.no_grad():
        maps = model.model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True).attentions
    if family == "llava":  # CLS row, summed over heads; patch columns
        return [(maps[0][b, :, 0, 1:].sum(0), maps[summary_layer][b, :, 0, 1:].sum(0))
                for b in range(maps[0].shape[0])]
    pooled = []  # Gemma 3's SigLIP: attention received (mean over query patches), pooled 4x4 -> 2x2 as the projector
    for b in range(maps[0].shape[0]):
        pair = []
        for layer in (0, summary_layer):
            received = maps[layer][b].mean(1).sum(0).view(1, 1, 4, 4)
            pair.append(torch.nn.functional.avg_pool2d(received, 2).flatten())
        pooled.append(tuple(pair))
    return pooled


def _qwen_maps(model, inputs, summary_layer):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    seen = {}

    def grab(layer):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            q, k, _ = module.qkv(h).reshape(h.shape[0], 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, *kwargs["position_embeddings"])
            edges = kwargs["cu_seqlens"].tolist()
            scores = []
            for a, b in itertools.pairwise(edges):
                logits = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * module.scaling
                received = torch.softmax(logits, -1).mean(1).sum(0)  # [N]
                scores.append(received.view(-1, 4).mean(-1))  # 2x2 merged patches are consecutive
            seen[layer] = scores
        return hook

    blocks = model.model.visual.blocks
    last = summary_layer % len(blocks)
    handles = [blocks[i].attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i in {0, last}]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    return list(zip(seen[0], seen[last]))


def _pixel_shuffle_maps(model, inputs, summary_layer):
    """Idefics3 / SmolVLM: per tower image, the attention each patch receives (eager, mean over query patches, summed
    over heads), then each LLM token's score is the mean over the patches the connector's own ``pixel_shuffle`` puts
    into it (found by shuffling the patch indices, not by assuming a pooling)."""
    seen = {}

    def grab(layer):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            split = lambda x: x.view(*h.shape[:2], module.num_heads, -1).transpose(1, 2)
            q, k = split(module.q_proj(h)), split(module.k_proj(h))
            received = torch.softmax(q @ k.transpose(-1, -2) * module.scale, -1).mean(2).sum(1)  # [images, N]
            seen[layer] = received
        return hook

    layers = model.model.vision_model.encoder.layers
    last = summary_layer % len(layers)
    handles = [layers[i].self_attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i in {0, last}]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    patches = seen[0].shape[1]
    index = torch.arange(patches, dtype=torch.float64)[None, :, None]
    groups = model.model.connector.pixel_shuffle(index, model.config.scale_factor)[0].long()  # [tokens, s^2]
    assert torch.equal(groups.flatten().sort().values, torch.arange(patches))
    return [(seen[0][i][groups].mean(-1), seen[last][i][groups].mean(-1)) for i in range(seen[0].shape[0])]


def _oracle_tokens(family, inputs, mask, ratio=0.25, factor=1.5, summary_layer=-2):
    local, summary = [], []
    for loc, summ in _vision_maps(family, inputs, summary_layer):
        q1, q3 = np.percentile(summ.double().numpy(), [25, 75])
        s = torch.from_numpy(summ.double().numpy() > q3 + factor * (q3 - q1))
        top = torch.zeros_like(s)
        top[torch.topk(loc, int(loc.numel() * ratio)).indices] = True
        local.append(top & ~s)
        summary.append(s)
    flat_local, flat_summary = torch.zeros_like(mask), torch.zeros_like(mask)
    flat_local[mask], flat_summary[mask] = torch.cat(local), torch.cat(summary)
    return flat_local, flat_summary


# The tiny towers have 2 layers, so the paper's penultimate layer is the first one: the second case reads the
# summary tokens from the last layer, with every score above Q3 an outlier, so both sets are non-empty.
CHOICES = [(1.5, -2), (0.0, -1)]


@pytest.mark.parametrize("family", PAINT_FAMILIES)
@pytest.mark.parametrize(("factor", "summary_layer"), CHOICES)
def test_token_choice_matches_the_vision_towers_eager_maps(family, factor, summary_layer):
    model = tiny_model(family)
    inputs = padded_inputs(model, family)
    mask = image_mask(model, inputs)
    with torch.no_grad(), patchattn.patched(model, "paint", start_layer=0, iqr_factor=factor,
                                            summary_layer=summary_layer):
        model(**inputs)
        tokens = _capture(model).tokens
    local, summary = _oracle_tokens(family, inputs, mask, factor=factor, summary_layer=summary_layer)
    assert torch.equal(tokens.local, local) and torch.equal(tokens.summary, summary)
    assert local.any() and not (local & summary).any()
    if factor == 0.0:
        assert summary.any()  # the summary path is exercised


# ---- whole models against the eager oracle ----------------------------------------------------------------------
@pytest.mark.parametrize("family", PAINT_FAMILIES)
@pytest.mark.parametrize(("factor", "summary_layer"), CHOICES)
def test_model_matches_the_eager_oracle_prefill_and_decode(family, factor, summary_layer):
    model = tiny_model(family)
    inputs = padded_inputs(model, family)
    mask = image_mask(model, inputs)
    oracle = Oracle("paint", layers={0, 1, 2}, alpha=0.7, beta=0.3)
    oracle.local, oracle.summary = _oracle_tokens(family, inputs, mask, factor=factor, summary_layer=summary_layer)
    reference = oracle_model(family, oracle, f"paint_oracle_{family}_{factor}")
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = reference(**inputs).logits
        dense = model(**inputs).logits
        patchattn.patch(model, "paint", start_layer=0, iqr_factor=factor, summary_layer=summary_layer)
        got = model(**inputs).logits
    assert max_abs_diff(got[valid], expected[valid]) <= TOL
    assert torch.equal(got[:, :-1], dense[:, :-1])  # only the last row is edited
    assert max_abs_diff(got[:, -1], dense[:, -1]) > 1e-4
    tokens = _capture(model).tokens
    settings = dict(SETTINGS, output_scores=True, return_dict_in_generate=True)
    got_run, expected_run = model.generate(**inputs, **settings), reference.generate(**inputs, **settings)
    assert torch.equal(got_run.sequences, expected_run.sequences)
    assert max(max_abs_diff(a, b) for a, b in zip(got_run.scores, expected_run.scores)) <= TOL
    after = _capture(model).tokens  # generate's prefill chose again (same image: same tokens); its steps kept them
    assert after is not tokens and torch.equal(after.local, tokens.local) and torch.equal(after.summary, tokens.summary)
    handle = patchattn.get_handle(model)
    assert after.source is model.get_submodule(handle.modules[0]).patchattn.context.layout.image_token_mask
    patchattn.unpatch(model)


def test_paper_layers_by_default():
    model = tiny_model("gemma3")  # 3 text layers: the paper's 2..L-1 edits the last one only
    handle = patchattn.patch(model, "paint")
    states = [model.get_submodule(n).patchattn for n in handle.modules]
    assert [s.method_state.active for s in states if s.role == "text"] == [False, False, True]
    patchattn.unpatch(model)
    handle = patchattn.patch(model, "paint", start_layer=1, end_layer=2)
    states = [model.get_submodule(n).patchattn for n in handle.modules]
    assert [s.method_state.active for s in states if s.role == "text"] == [False, True, False]
    patchattn.unpatch(model)


# ---- the edit and the last-row path, on random tensors --------------------------------------------------------------
def test_the_last_row_path_is_exact_with_gqa_window_and_padding():
    torch.manual_seed(2)
    batch, heads, kv_heads, length, dim = 3, 4, 2, 9, 8
    q = torch.randn(batch, heads, length, dim, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, length, dim, dtype=torch.float64)
    keys = torch.arange(length)
    window = (keys[None, :] <= keys[:, None]) & (keys[None, :] > keys[:, None] - 5)
    mask = window[None, None].repeat(batch, 1, 1, 1)
    mask[1, :, :, :3] = False  # left padding of row 1
    mask[2, :, -1, :] = False  # a fully masked last row (padding) keeps the fused value
    dense = torch.matmul(full_probs(None, q, k, mask, dim**-0.5), v.repeat_interleave(2, 1)).transpose(1, 2)
    fused = dense + 1.0  # any fused output: rows before the last must come back untouched
    row = _lastrow.last_row(q, k, v, mask, scaling=dim**-0.5)
    out = _lastrow.edited_last_row(fused, row, lambda logits, allowed: logits)
    assert torch.equal(out[:, :-1], fused[:, :-1])
    assert torch.allclose(out[:2, -1], dense[:2, -1], atol=1e-12)
    assert torch.equal(out[2, -1], fused[2, -1])


def test_boost_matches_the_released_edit_and_the_head_variant():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 6, dtype=torch.float64)
    allowed = torch.ones(2, 1, 6, dtype=torch.bool)
    allowed[1, 0, 0] = False
    boost = torch.tensor([[0.7, 0.0, 0.3, 0.0, 0.0, 0.0], [0.0, 0.7, 0.7, 0.3, 0.0, 0.0]], dtype=torch.float64)
    got = paint.boost_logits(logits.masked_fill(~allowed, float("-inf")), allowed, boost)
    expected = logits + boost[:, None] * logits.abs()
    assert torch.allclose(got[allowed.expand_as(got)], expected[allowed.expand_as(got)])
    image = boost > 0
    got = paint.boost_logits(logits, torch.ones_like(allowed), boost, image=image, visual_heads=True)
    share = (torch.softmax(logits, -1) * image[:, None]).sum(-1)  # [B, H]
    weight = share / share.mean(-1, keepdim=True)
    assert torch.allclose(got, logits + weight[..., None] * boost[:, None] * logits.abs())


def test_head_variant_runs_on_a_model_and_differs():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    with torch.no_grad():
        with patchattn.patched(model, "paint", start_layer=0):
            uniform = model(**inputs).logits
        with patchattn.patched(model, "paint", start_layer=0, heads="visual"):
            visual = model(**inputs).logits
    assert torch.isfinite(visual).all() and max_abs_diff(visual[:, -1], uniform[:, -1]) > 0


# ---- dense equivalence, unpatch, targets, families -------------------------------------------------------------------
@pytest.mark.parametrize("family", PAINT_FAMILIES)
def test_zero_boost_is_dense_exactly(family):
    model = tiny_model(family)
    inputs = padded_inputs(model, family)
    with torch.no_grad():
        reference = model(**inputs).logits
        with patchattn.patched(model, "paint", start_layer=0, alpha=0.0, beta=0.0):
            assert torch.equal(model(**inputs).logits, reference)


@pytest.mark.parametrize("family", PAINT_FAMILIES)
def test_unpatch_restores_the_model_and_its_vision_tower(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model, family)
    configs = {n: m.config for n, m in model.named_modules() if getattr(m, "config", None) is not None}
    with torch.no_grad():
        reference = model(**inputs).logits
        patchattn.patch(model, "paint", start_layer=0)
        captured = [m for m in model.modules() if hasattr(m, "_patchattn_paint")]
        assert len(captured) == 1  # tiny towers of 2 layers: the first layer is the penultimate
        model.generate(**inputs, **SETTINGS)
        patchattn.unpatch(model)
        assert torch.equal(model(**inputs).logits, reference)
    assert all(m.config is configs[n] for n, m in model.named_modules() if n in configs)
    assert not any(hasattr(m, "_patchattn_paint") or hasattr(m, "patchattn") for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules() if m is not model)


def test_the_capture_leaves_the_vision_tower_exact_and_targets_are_respected():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    vision = model.model.vision_tower
    with torch.no_grad():
        reference = vision(pixel_values=inputs["pixel_values"]).last_hidden_state
        with patchattn.patched(model, "paint"):
            assert torch.equal(vision(pixel_values=inputs["pixel_values"]).last_hidden_state, reference)
        with patchattn.patched(model, "paint", targets="vision"), pytest.raises(NotImplementedError, match="paint"):
            model(**inputs)


def test_text_only_input_and_a_new_prompt():
    model = tiny_model("llava")
    text = tiny_inputs(model, "llava", with_image=False)
    inputs = tiny_inputs(model, "llava")
    with torch.no_grad():
        reference = model(**text).logits
        with patchattn.patched(model, "paint", start_layer=0):
            model(**inputs)
            first = _capture(model).tokens
            assert torch.equal(model(**text).logits, reference)  # the previous image's tokens are not applied
            model(**inputs)
            assert _capture(model).tokens is not first and torch.equal(_capture(model).tokens.local, first.local)


def test_unsupported_family_and_bad_fields_are_refused(monkeypatch):
    model = tiny_model("idefics3")
    monkeypatch.delitem(paint.TOKEN_MAPS, "idefics3")  # a family with no patch -> token map is refused at patch time
    with pytest.raises(ValueError, match="llava"):
        patchattn.patch(model, "paint")
    assert patchattn.get_handle(model) is None and not any(hasattr(m, "patchattn") for m in model.modules())
    with pytest.raises(ValueError, match="CLS"):
        patchattn.patch(tiny_model("qwen2_vl"), "paint", scores="cls")
    with pytest.raises(ValueError, match="end_layer"):
        patchattn.patch(tiny_model("llava"), "paint", start_layer=1, end_layer=1)
    with pytest.raises(ValueError, match="summary_layer"):
        patchattn.patch(tiny_model("llava"), "paint", summary_layer=5)
    with pytest.raises(ValueError, match="lvlm"):
        patchattn.patch(tiny_model("llama"), "paint")


def test_gemma3_sliding_window_cache_keeps_the_image_columns_aligned():
    """A short prompt: Gemma 3's sliding-window layers (window 8) drop the prompt's first keys while decoding, with
    the image still inside the window; the edited columns must follow the cache (the newest keys), as the oracle's."""
    model = tiny_model("gemma3")
    inputs = tiny_inputs(model, "gemma3", batch=1, text_len=4)  # 8 tokens, the image at 2..5
    mask = image_mask(model, inputs)
    oracle = Oracle("paint", layers={0, 1, 2}, alpha=0.7, beta=0.3)
    oracle.local, oracle.summary = _oracle_tokens("gemma3", inputs, mask, factor=0.0, summary_layer=-1)
    reference = oracle_model("gemma3", oracle, "paint_oracle_gemma3_short")
    settings = dict(SETTINGS, output_scores=True, return_dict_in_generate=True)
    expected = reference.generate(**inputs, **settings)
    with patchattn.patched(model, "paint", start_layer=0, iqr_factor=0.0, summary_layer=-1):
        got = model.generate(**inputs, **settings)
        assert _capture(model).tokens.local.any()
    assert torch.equal(got.sequences, expected.sequences)
    assert max(max_abs_diff(a, b) for a, b in zip(got.scores, expected.scores)) <= TOL


def test_a_model_loaded_with_the_name_warns_until_adopted(tmp_path):
    from transformers import AutoModelForImageTextToText

    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    with torch.no_grad():
        reference = model(**inputs).logits
        patchattn.patch(model, "paint", start_layer=0)
        patched = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    with torch.no_grad(), pytest.warns(UserWarning, match="get_handle"):
        assert torch.equal(loaded(**inputs).logits, reference)
    assert patchattn.get_handle(loaded) is not None
    with torch.no_grad():
        assert max_abs_diff(loaded(**inputs).logits, patched) <= TOL


def test_the_attention_function_matches_its_reference_prefill_then_decode():
    from patchattn.state import PatchContext, PatchState

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, 12, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    image = torch.zeros(2, 10, dtype=torch.bool)
    image[0, 2:8], image[1, 4:9] = True, True
    local, summary = torch.zeros_like(image), torch.zeros_like(image)
    local[0, [2, 5]], local[1, [4, 6, 7]], summary[0, 7], summary[1, 8] = True, True, True, True
    starts = torch.tensor([0, 3])
    keys = torch.arange(12)
    allowed = ((keys[None, :] <= keys[:, None])[None] & (keys >= starts[:, None, None]))[:, None]
    context = PatchContext(family="llava", kind="lvlm")
    context.layout.image_token_mask = image
    capture = paint.PaintCapture(paint.TokenMap(cls=True), True, 16, 0.25, 1.5)
    capture.tokens = paint.PaintTokens(local, summary, image)
    context.extras["paint"] = capture
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    module.patchattn = PatchState(patchattn.get_config("paint"), 3, "text", context, paint.PaintState(active=True))
    valid = (torch.arange(10)[None] >= starts[:, None])[:, :, None, None]
    pad = torch.zeros(2, 2, dtype=torch.bool)
    for lo, hi in ((0, 10), (10, 11), (11, 12)):  # the prefill, then two decode steps
        out, _ = paint.paint_attention(module, q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], allowed[:, :, lo:hi, :hi])
        ref = paint.paint_reference(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], torch.cat([local, pad], 1)[:, :hi],
                                    torch.cat([summary, pad], 1)[:, :hi], alpha=0.7, beta=0.3,
                                    allowed=allowed[:, :, lo:hi, :hi]).transpose(1, 2)
        rows = valid if hi == 10 else torch.ones(2, 1, 1, 1, dtype=torch.bool)
        assert max_abs_diff(out * rows, ref * rows) <= 1e-12


# ---- Qwen2.5-VL: a windowed tower (merge groups in window order), scores from its full-attention layers -----------
def _qwen25_model():
    from transformers import AutoModelForImageTextToText

    from patchattn.models import TINY_CONFIGS

    config = TINY_CONFIGS["qwen2_5_vl"]()
    config.vision_config.depth, config.vision_config.fullatt_block_indexes = 6, [1, 3, 5]
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config).eval()


def _qwen25_inputs(model, batch=2):
    """One 8x8-patch image per row (16 image tokens): 4 windows of 2x2 merged tokens, so window order is not image
    order."""
    gen = torch.Generator().manual_seed(0)
    config = model.config
    ids = torch.randint(3, 100, (batch, 14), generator=gen)
    ids = torch.cat([ids[:, :2], torch.full((batch, 16), config.image_token_id), ids[:, 2:]], dim=1)
    v = config.vision_config
    return {"input_ids": ids, "mm_token_type_ids": (ids == config.image_token_id).long(),
            "image_grid_thw": torch.tensor([[1, 8, 8]] * batch),
            "pixel_values": torch.randn(batch * 64, 3 * v.temporal_patch_size * v.patch_size ** 2, generator=gen)}


def _qwen25_oracle_scores(model, inputs, layers):
    """Per image and layer, the attention each merged token receives (eager, per image, mean over query patches,
    summed over heads), in *image* order: the window permutation is found by matching the patch embeddings (image
    order) against the first block's input (window order)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    seen, visual = {}, model.model.visual

    def embedded(_module, _args, output):
        seen["embedded"] = output

    def first_block(_module, args, kwargs):
        seen["permuted"] = args[0] if args else kwargs["hidden_states"]

    def grab(layer):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            q, k, _ = module.qkv(h).reshape(h.shape[0], 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, *kwargs["position_embeddings"])
            scores = []
            for a, b in itertools.pairwise(kwargs["cu_seqlens"].tolist()):
                logits = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * module.scaling
                scores.append(torch.softmax(logits, -1).mean(1).sum(0).view(-1, 4).mean(-1))
            seen[layer] = scores
        return hook

    handles = [visual.patch_embed.register_forward_hook(embedded),
               visual.blocks[0].register_forward_pre_hook(first_block, with_kwargs=True)]
    handles += [visual.blocks[i].attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i in layers]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    groups = seen["embedded"].shape[0] // 4
    original = seen["embedded"].reshape(groups, -1)
    permuted = seen["permuted"].reshape(groups, -1)
    source = torch.cdist(permuted, original).argmin(-1)  # window-order group -> image-order group
    assert torch.equal(source.sort().values, torch.arange(groups))
    per_image = groups // len(seen[layers[0]])
    out = {}
    for layer in layers:
        placed = torch.empty(groups)
        placed[source] = torch.cat(seen[layer])
        out[layer] = placed.view(-1, per_image)
    return out, source


def test_qwen2_5_vl_scores_come_from_full_attention_layers_in_image_order():
    model = _qwen25_model()
    inputs = _qwen25_inputs(model)
    mask = image_mask(model, inputs)
    scores, source = _qwen25_oracle_scores(model, inputs, [1, 3])
    assert not torch.equal(source, torch.arange(source.numel())), "the case must permute the tokens"
    local, summary = [], []
    for loc, summ in zip(scores[1], scores[3]):  # local_layer 0 -> full layer 1, summary_layer -2 -> full layer 3
        q1, q3 = np.percentile(summ.double().numpy(), [25, 75])
        s = torch.from_numpy(summ.double().numpy() > q3 + 0.0 * (q3 - q1))
        top = torch.zeros_like(s)
        top[torch.topk(loc, int(loc.numel() * 0.25)).indices] = True
        local.append(top & ~s)
        summary.append(s)
    flat_local, flat_summary = torch.zeros_like(mask), torch.zeros_like(mask)
    flat_local[mask], flat_summary[mask] = torch.cat(local), torch.cat(summary)
    with torch.no_grad():
        dense = model(**inputs).logits
        with patchattn.patched(model, "paint", start_layer=0, iqr_factor=0.0):
            got = model(**inputs).logits
            tokens = _capture(model).tokens
            captured = sorted(n for n, m in model.named_modules() if hasattr(m, "_patchattn_paint"))
        assert torch.equal(model(**inputs).logits, dense)  # unpatch is exact
    assert captured == ["model.visual.blocks.1.attn", "model.visual.blocks.3.attn"]
    assert flat_local.any() and flat_summary.any()
    assert torch.equal(tokens.local, flat_local) and torch.equal(tokens.summary, flat_summary)
    assert torch.equal(got[:, :-1], dense[:, :-1]) and max_abs_diff(got[:, -1], dense[:, -1]) > 1e-5


def test_qwen2_5_vl_layer_indices_count_full_attention_layers():
    with pytest.raises(ValueError, match="3 full-attention layers"):
        patchattn.patch(_qwen25_model(), "paint", summary_layer=3)


# ---- SmolVLM's 4x4 pixel shuffle, split images --------------------------------------------------------------------
def _smolvlm_scale4(oracle_name=None):
    """SmolVLM's connector (scale_factor 4) on a 16x16 patch grid: 16 image tokens of 16 patches each."""
    from transformers import AutoModelForImageTextToText

    from patchattn.models import TINY_CONFIGS

    config = TINY_CONFIGS["smolvlm"]()
    config.scale_factor, config.vision_config.image_size, config.vision_config.patch_size = 4, 32, 2
    if oracle_name is not None:
        config.text_config._attn_implementation = oracle_name
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config).eval()


def _uneven_split_inputs(model):
    """Row 0 with three tower images, row 1 with two (left-padded), its third image all zeros: the processor's padding
    image, which Idefics3 drops before the tower."""
    from lvlm_cases import split_inputs

    a, b = split_inputs(model, images=3, batch=1), split_inputs(model, images=2, batch=1, seed=1)
    pad = a["input_ids"].shape[1] - b["input_ids"].shape[1]
    ids = torch.cat([a["input_ids"], torch.nn.functional.pad(b["input_ids"], (pad, 0))])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    pixels = torch.cat([a["pixel_values"], torch.cat([b["pixel_values"], torch.zeros_like(b["pixel_values"][:, :1])],
                                                     1)])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


@pytest.mark.parametrize("uneven", [False, True], ids=["3-images", "3-and-2-images"])
def test_smolvlm_pixel_shuffle_4x4_with_split_images_matches_the_oracle(uneven):
    """Three tower images per row (two crops and the global image; or two in the second row and a padding image),
    each scored on its own: the tokens are the brute-force pooling over the connector's own pixel-shuffle groups,
    and the model is the eager oracle's."""
    from lvlm_cases import split_inputs
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from patchattn.testing import left_pad

    model = _smolvlm_scale4()
    inputs = _uneven_split_inputs(model) if uneven else left_pad(split_inputs(model), [0, 3])
    mask = image_mask(model, inputs)
    assert mask.sum(1).tolist() == [3 * 16, (2 if uneven else 3) * 16]
    local, summary = [], []
    for loc, summ in _pixel_shuffle_maps(model, inputs, summary_layer=-1):
        s = torch.from_numpy(summ.double().numpy() > np.percentile(summ.double().numpy(), 75))  # iqr_factor 0
        top = torch.zeros_like(s)
        top[torch.topk(loc, 4).indices] = True
        local.append(top & ~s)
        summary.append(s)
    flat_local, flat_summary = torch.zeros_like(mask), torch.zeros_like(mask)
    flat_local[mask], flat_summary[mask] = torch.cat(local), torch.cat(summary)
    oracle = Oracle("paint", layers={0, 1, 2}, alpha=0.7, beta=0.3)
    oracle.local, oracle.summary = flat_local, flat_summary
    AttentionInterface.register("paint_oracle_smolvlm4", oracle)
    AttentionMaskInterface.register("paint_oracle_smolvlm4", sdpa_mask)
    reference = _smolvlm_scale4("paint_oracle_smolvlm4")
    valid = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected, dense = reference(**inputs).logits, model(**inputs).logits
        with patchattn.patched(model, "paint", start_layer=0, iqr_factor=0.0, summary_layer=-1):
            got = model(**inputs).logits
            tokens = _capture(model).tokens
    assert flat_local.any() and flat_summary.any()
    assert torch.equal(tokens.local, flat_local) and torch.equal(tokens.summary, flat_summary)
    assert max_abs_diff(got[valid], expected[valid]) <= TOL
    assert torch.equal(got[:, :-1], dense[:, :-1]) and max_abs_diff(got[:, -1], dense[:, -1]) > 1e-4


@pytest.mark.parametrize("rows", [1, 3])
def test_tokens_placed_on_the_image_mask_as_boolean_indexing_places_them(rows):
    torch.manual_seed(rows)
    mask = torch.rand(rows, 37) < 0.4
    values = torch.rand(2, int(mask.sum())) < 0.5
    expected = torch.zeros(2, *mask.shape, dtype=torch.bool)
    expected[0][mask], expected[1][mask] = values[0], values[1]
    assert torch.equal(paint.place_on_mask(mask, values), expected)



# ---- received scores: the column-mean kernel against the materialised-softmax oracle ----------------------------
def _vision_call(patches=256, heads=8, kv_heads=8, dim=80, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, patches, dim, generator=gen) * 1.5
    k = torch.randn(1, kv_heads, patches, dim, generator=gen)
    return q.to(dtype), k.to(dtype)


def _chosen(score, token_map):
    tokens = paint.token_scores(score, token_map)
    return paint.local_tokens(tokens, 0.25), paint.summary_tokens(tokens, 0.0), tokens


def _local_margin(tokens):
    """The gap between the last local token's score and the next one, relative to the scores' scale."""
    top = tokens.topk(int(tokens.numel() * 0.25) + 1).values
    return ((top[-2] - top[-1]) / tokens.abs().max()).item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [8, 2], ids=["mha", "gqa"])
def test_received_scores_match_the_reference_oracle_and_choose_the_same_tokens(backend, dtype, kv_heads, request):
    """``patch_scores`` (column means, no score matrix on Triton) against ``patch_scores_reference`` (the softmax rows
    materialised, the code before note 60): fp32 rounding apart, for fp32 and bf16 inputs (both compute in fp32 from
    the same values), and the same local / summary tokens (Qwen2-VL's 2x2 merge: a token per 4 patches)."""
    patches, heads = (256, 8) if backend == "torch" else (64, 4)  # the interpreter is slow: a smaller tower
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    q, k = _vision_call(patches, heads, kv_heads * heads // 8, dtype=dtype, seed=kv_heads)
    got = paint.patch_scores(q, k, None, scaling=80 ** -0.5, use_cls=False, chunk=48, backend=backend)
    want = paint.patch_scores_reference(q, k, None, scaling=80 ** -0.5, use_cls=False, chunk=48)
    assert got.dtype == want.dtype == torch.float32 and got.shape == (1, patches)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    token_map = paint.TokenMap(merge=4)
    (local, summary, tokens), (want_local, want_summary, _) = _chosen(got[0], token_map), _chosen(want[0], token_map)
    assert _local_margin(tokens) > 1e-4, "the case must not be near-tied at the local cut"
    assert local.sum() == patches // 16 and summary.any()
    assert torch.equal(local, want_local) and torch.equal(summary, want_summary)


@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
def test_received_scores_with_a_mask_and_in_float64_match_the_oracle(additive):
    """A mask (padded patches: Idefics3 / SmolVLM) and float64 run the torch path, against the oracle; the CLS row is
    the oracle's own code."""
    q, k = _vision_call(patches=90, heads=4, kv_heads=2, dim=32)
    allowed = torch.ones(1, 1, 90, 90, dtype=torch.bool)
    allowed[..., 70:] = False  # the last 20 patches are padding: no row sees them
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min) if additive else allowed
    got = paint.patch_scores(q, k, mask, scaling=0.2, use_cls=False, chunk=16)
    want = paint.patch_scores_reference(q, k, mask, scaling=0.2, use_cls=False, chunk=16)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5 and not got[:, 70:].any()
    got, want = (f(q.double(), k.double(), None, scaling=0.2, use_cls=False, chunk=16)
                 for f in (paint.patch_scores, paint.patch_scores_reference))
    assert got.dtype == torch.float64 and (got - want).abs().max().item() <= 1e-13
    cls = paint.patch_scores(q, k, None, scaling=0.2, use_cls=True, chunk=16)
    assert torch.equal(cls, paint.patch_scores_reference(q, k, None, scaling=0.2, use_cls=True, chunk=16))


def test_received_scores_on_triton_make_no_score_tensor(triton_interpreter):
    """On the Triton path (a GPU; the interpreter here) no tensor larger than the inputs is made: per head O(N)
    (each row's log-sum-exp, each key's sum).  Before note 60 every chunk made four ``H x chunk x N`` fp32 tensors
    (logits, scaled logits, softmax, ``nan_to_num``)."""
    q, k = _vision_call(patches=128, heads=2, kv_heads=2, dim=32)
    with Allocations() as seen:
        paint.patch_scores(q, k, None, scaling=0.2, use_cls=False, chunk=256)
    assert max(seen.sizes) <= q.numel(), f"a {max(seen.sizes)}-element tensor (inputs: {q.numel()})"


def test_received_scores_on_torch_make_one_score_tensor_per_chunk():
    """The torch path (CPU) makes one ``H x chunk x N`` tensor per chunk (the product; max, exp and the row
    weights work in place or on ``O(chunk)`` rows); before note 60 it made four."""
    q, k = _vision_call(patches=256, heads=4, kv_heads=4, dim=32)
    with Allocations() as seen:
        paint.patch_scores(q, k, None, scaling=0.2, use_cls=False, chunk=64)  # CPU: the torch path
    assert sum(size >= 4 * 64 * 256 for size in seen.sizes) == 256 // 64  # one per chunk


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
def test_model_on_the_triton_kernel_chooses_the_eager_maps_tokens(triton_interpreter, family):
    """Tiny CLS-less towers end to end with the received scores on Triton (interpreter on CPU): the tokens of the
    eager attention maps."""
    model = tiny_model(family)
    inputs = padded_inputs(model, family)
    with torch.no_grad(), patchattn.patched(model, "paint", start_layer=0, iqr_factor=0.0, summary_layer=-1):
        model(**inputs)
        tokens = _capture(model).tokens
    local, summary = _oracle_tokens(family, inputs, image_mask(model, inputs), factor=0.0, summary_layer=-1)
    assert local.any() and summary.any()
    assert torch.equal(tokens.local, local) and torch.equal(tokens.summary, summary)
