"""var: the fused edit (one class-mass pass) against the eager T x T oracle, row sums kept, exactly the freed
sink mass moved to the image's non-sink tokens, sink tokens found from planted massive activations on tiny LLaVA,
Qwen2-VL and Gemma 3, decode steps on the prefill's choices, padding, several images, dense equivalence, unpatch,
and ``calibrate sink-dims`` finding a planted dimension."""

import json
import types
import warnings

import pytest
import torch
from lvlm_cases import family_inputs

import patchattn
from patchattn.calibrate import sink_dims as calibrate_sink_dims
from patchattn.cli import main as cli_main
from patchattn.methods import var
from patchattn.state import get_state
from patchattn.testing import LVLM_FAMILIES, left_pad, max_abs_diff, tiny_model

DIM = 17  # the planted sink dimension (text hidden size 64 in every tiny model)
TOL = 1e-5
EXACT = 1e-6  # fp64 inputs, fp32 lse from the kernel
LVLMS = list(LVLM_FAMILIES)


# ---- the edit on one attention call --------------------------------------------------------------------------
def _call(dtype=torch.float32, batch=2, heads=4, kv_heads=2, length=40, dim=16, seed=0, identity_values=False):
    """Random q/k/v with an image span [4, 24) and planted sinks (key 0, image keys 6 and 15) that attract the
    queries; left padding of 3 tokens in the second row."""
    gen = torch.Generator().manual_seed(seed)
    dim = length if identity_values else dim
    q = torch.randn(batch, heads, length, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=torch.float64) * 0.5
    v = torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=torch.float64)
    if identity_values:  # each output row is then the row of attention weights
        v = torch.eye(length, dtype=torch.float64).expand(batch, kv_heads, -1, -1).clone()
    direction = q.mean((1, 2))[:, None]
    direction = direction / direction.norm(dim=-1, keepdim=True)
    sinks = torch.zeros(batch, length, dtype=torch.bool)
    for position, strength in ((0, 3.0), (6, 2.5), (15, 2.0)):
        k[:, :, position] += strength * direction
        sinks[:, position] = True
    image = torch.zeros(batch, length, dtype=torch.bool)
    image[:, 4:24] = True
    k[:, :, 4:24] += 0.8 * direction  # the image draws attention: some rows pass summ
    image[1, :4] = False
    starts = torch.tensor([0, 3], dtype=torch.int32)
    sinks[1, 3] = True  # the first real token of the padded row
    return q.to(dtype), k.to(dtype), v.to(dtype), image, sinks, starts


SETTINGS = {"recycled": 0.6, "rho": 0.8, "summ": 0.6, "budget": "all"}  # a mix of selected and other rows


def _fused(q, k, v, image, sinks, starts, **settings):
    settings = {**SETTINGS, **settings}
    rows = var.editable_rows(image, q.shape[2], starts)
    correction, selected = var.redistribute(q, k, v, image, sinks, rows, scale=q.shape[-1] ** -0.5, starts=starts,
                                            backend="torch", **settings)
    dense, _, _, _ = var.var_reference(q, k, v, image, sinks, rows, p=0.0, rho=1.0, summ=1.0, starts=starts)
    return torch.where(selected[..., None], dense.to(correction.dtype) + correction, dense), selected, rows


def _oracle(q, k, v, image, sinks, starts, **settings):
    settings = {**SETTINGS, **settings}
    rows = var.editable_rows(image, q.shape[2], starts)
    return var.var_reference(q, k, v, image, sinks, rows, p=settings["recycled"], rho=settings["rho"],
                             summ=settings["summ"], budget=settings["budget"], starts=starts)


@pytest.mark.parametrize("budget", ["all", "visual"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_edit_matches_the_eager_oracle(dtype, budget):
    q, k, v, image, sinks, starts = _call(dtype)
    out, selected, rows = _fused(q, k, v, image, sinks, starts, budget=budget)
    ref, probs, _, ref_selected = _oracle(q, k, v, image, sinks, starts, budget=budget)
    assert torch.equal(selected, ref_selected)
    assert selected.any() and (rows[:, None] & ~selected).any(), "the case must select some rows and not others"
    assert not selected[:, :, :24].any(), "only text rows after the image are edited"
    # the kernels' lse is fp32 whatever the inputs: the row masses carry its rounding
    assert max_abs_diff(out, ref) <= (1e-6 if dtype == torch.float64 else 2e-5)
    assert max_abs_diff(ref, probs @ v.repeat_interleave(2, 1)) > 1e-2, "the edit must change the output"


def test_weights_keep_row_sums_and_move_exactly_the_freed_sink_mass():
    """With values = identity the fused output *is* A': row sums 1, sinks keep 1 - p, the text non-sink tokens are
    untouched, and the image's non-sink tokens gain exactly p * A(sinks), in proportion to their weights."""
    q, k, v, image, sinks, starts = _call(torch.float64, identity_values=True)
    p = 0.6
    new, selected, _ = _fused(q, k, v, image, sinks, starts, recycled=p)
    _, probs, oracle_new, _ = _oracle(q, k, v, image, sinks, starts, recycled=p)
    assert max_abs_diff(new, oracle_new) <= EXACT
    real = torch.arange(40)[None] >= starts.long()[:, None]  # real query rows
    sums = new.sum(-1)
    assert max_abs_diff(sums[real[:, None].expand_as(sums)], torch.ones(())) <= EXACT
    cols_sink, cols_ins = sinks[:, None, None, :], (image & ~sinks)[:, None, None, :]
    cols_text = ~image[:, None, None, :] & ~cols_sink
    sel = selected[..., None]
    freed = p * (probs * cols_sink).sum(-1, keepdim=True)
    assert max_abs_diff(torch.where(sel & cols_sink, new, 0), torch.where(sel & cols_sink, (1 - p) * probs, 0)) <= EXACT
    assert max_abs_diff(torch.where(cols_text, new, 0), torch.where(cols_text, probs, 0)) <= EXACT
    gained = torch.where(cols_ins, new - probs, 0)
    assert max_abs_diff(gained.sum(-1, keepdim=True), torch.where(sel, freed, 0)) <= EXACT
    share = probs * cols_ins / (probs * cols_ins).sum(-1, keepdim=True)
    assert max_abs_diff(torch.where(sel & cols_ins, gained, 0), torch.where(sel & cols_ins, freed * share, 0)) <= EXACT
    assert max_abs_diff(torch.where(~sel, new, 0), torch.where(~sel, probs, 0)) <= EXACT  # other rows: A itself


def test_no_visual_sink_or_no_image_centric_row_changes_nothing():
    q, k, v, image, sinks, starts = _call(torch.float64)
    no_visual = sinks & ~image
    _, selected, _ = _fused(q, k, v, image, no_visual, starts)
    assert not selected.any()  # the released code's gate: no visual sink, no image-centric head
    _, selected, _ = _fused(q, k, v, image, sinks, starts, summ=1.0)
    assert not selected.any()


# ---- tiny LVLMs with planted massive activations -------------------------------------------------------------
def _plant(model, positions: torch.Tensor, value: float = 400.0):
    """A pre-hook on the language model adding ``value`` at dimension DIM of the prefill tokens in ``positions``
    (bool [B, T]): those tokens carry a massive activation in the residual stream of every layer."""

    def hook(_module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] == positions.shape[1]:
            embeds = embeds.clone()
            embeds[..., DIM] = embeds[..., DIM] + value * positions.to(embeds.dtype)
            kwargs["inputs_embeds"] = embeds
        return args, kwargs

    return model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)


def _planted_positions(inputs, image_token):
    """The first real token and the 2nd and 4th image token of each row."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    planted = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(ids.shape[0]):
        planted[b, int(mask[b].argmax())] = True
        image = (ids[b] == image_token).nonzero()[:, 0]
        planted[b, image[[1, 3]]] = True
    return planted


def _config(**overrides):
    return {"sink_dims": [DIM], "tau": 4.0, "first_layer": 0, "except_last_layer": False, "summ": 0.05, "rho": 0.3,
            **overrides}


def _oracle_redistribute(q, k, v, image, sinks, rows, *, recycled, rho, summ, budget, scale, starts, backend,
                         classes=None):
    """The fused edit's interface, computed by the eager oracle (a model run through it is the reference)."""
    out, probs, _, selected = var.var_reference(q, k, v, image, sinks, rows, p=recycled, rho=rho, summ=summ,
                                                budget=budget, scale=scale, starts=starts)
    dense = probs @ v.repeat_interleave(q.shape[1] // k.shape[1], 1)
    return out - dense, selected


def _text_states(model):
    return [get_state(m) for n, m in model.named_modules() if get_state(m) is not None and get_state(m).role == "text"]


def _setup(family, pad=None):
    model = tiny_model(family)
    inputs = family_inputs(model, family)
    if pad is not None:
        inputs = left_pad(inputs, pad)
    return model, inputs, _plant(model, _planted_positions(inputs, model.config.image_token_id))


@pytest.mark.parametrize("family", LVLMS)
def test_model_matches_the_oracle_and_finds_the_planted_sinks(family, monkeypatch):
    model, inputs, _ = _setup(family)
    with torch.no_grad():
        reference = model(**inputs).logits
        with patchattn.patched(model, "var", **_config()):
            fused = model(**inputs).logits
            states = [s for s in _text_states(model) if s.method_state.active]
            assert states
            planted = _planted_positions(inputs, model.config.image_token_id)
            for state in states:
                assert torch.equal(state.method_state.sinks, planted)
            edited = [s.stats["selected"] for s in states]
            monkeypatch.setattr(var, "redistribute", _oracle_redistribute)
            oracle = model(**inputs).logits
        assert max(edited) > 0, f"{family}: no image-centric row was edited"
        assert max_abs_diff(fused, oracle) <= TOL
        assert max_abs_diff(fused, reference) > 1e-4
        assert max_abs_diff(model(**inputs).logits, reference) == 0.0  # unpatch is exact


@pytest.mark.parametrize("family", LVLMS)
def test_dense_equivalent_settings_are_exactly_dense(family):
    model, inputs, _ = _setup(family)
    with torch.no_grad():
        reference = model(**inputs).logits
        for overrides in ({"p": 0.0}, {"p": 1.0, "p_kept": True}, {"summ": 1.0}):
            with patchattn.patched(model, "var", **_config(**overrides)):
                assert torch.equal(model(**inputs).logits, reference), overrides
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no sink dimensions for a 64-wide backbone: a warning, and dense
            with patchattn.patched(model, "var"):
                assert torch.equal(model(**inputs).logits, reference)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_left_padded_batch_matches_the_oracle_and_each_row_alone(family, monkeypatch):
    model, inputs, handle = _setup(family, pad=[0, 3])
    with torch.no_grad(), patchattn.patched(model, "var", **_config()):
        fused = model(**inputs).logits
        handle.remove()
        alone = []
        for b in range(2):
            real = inputs["attention_mask"][b].bool()
            row = {k: (v[b : b + 1, real] if torch.is_tensor(v) and v.shape == inputs["input_ids"].shape else v[b : b + 1])
                   for k, v in inputs.items() if k != "attention_mask"}
            handle = _plant(model, _planted_positions(row, model.config.image_token_id))
            alone.append(model(**row).logits[0])
            handle.remove()
        _plant(model, _planted_positions(inputs, model.config.image_token_id))
        monkeypatch.setattr(var, "redistribute", _oracle_redistribute)
        oracle = model(**inputs).logits
    assert max_abs_diff(fused, oracle) <= TOL
    for b in range(2):
        real = inputs["attention_mask"][b].bool()
        assert max_abs_diff(fused[b, real], alone[b]) <= 1e-4


DECODE_CASES = [(f, None) for f in LVLMS] + [("llava", [0, 3]), ("gemma3", [2, 0])]


@pytest.mark.parametrize(("family", "pad"), DECODE_CASES, ids=[f"{f}-{p}" for f, p in DECODE_CASES])
def test_decode_steps_keep_the_prefill_choices(family, pad):
    """A decode step reads the prefill's frozen image and sink masks (the new token's own hidden state is not
    looked at): its logits are the last row of one forward over prompt + token, padded batches included."""
    model, inputs, handle = _setup(family, pad=pad)
    with torch.no_grad(), patchattn.patched(model, "var", **_config()):
        prefill = model(**inputs, use_cache=True)
        states = [s for s in _text_states(model) if s.method_state.active]
        frozen = [s.method_state.sinks.clone() for s in states]
        token = prefill.logits[:, -1].argmax(-1, keepdim=True)
        handle.remove()  # the decode step's input carries no planted activation (the prefill choice stands)
        grown = {k: torch.cat([inputs[k], torch.full_like(token, int(k == "attention_mask"))], 1)
                 for k in ("attention_mask", "mm_token_type_ids", "token_type_ids") if k in inputs}
        step = model(input_ids=token, past_key_values=prefill.past_key_values, use_cache=True, **grown)
        for state, before in zip(states, frozen):
            assert torch.equal(state.method_state.sinks, before)
        assert max(s.stats["selected"] for s in states) > 0, "the decode step edits no row"
        full_inputs = {**inputs, **grown, "input_ids": torch.cat([inputs["input_ids"], token], 1)}
        _plant(model, torch.nn.functional.pad(_planted_positions(inputs, model.config.image_token_id), (0, 1)))
        full = model(**full_inputs).logits[:, -1]
    assert max_abs_diff(step.logits[:, -1], full) <= 1e-4


def test_several_images_per_prompt(monkeypatch):
    """Two images in one LLaVA prompt: the text between them (after the first image) and after both is edited,
    sinks in either image count, and the model matches the oracle."""
    model = tiny_model("llava")
    image_token, n_image = model.config.image_token_id, 16
    gen = torch.Generator().manual_seed(1)
    text = torch.randint(3, 100, (1, 14), generator=gen)
    ids = torch.cat([text[:, :2], torch.full((1, n_image), image_token), text[:, 2:8],
                     torch.full((1, n_image), image_token), text[:, 8:]], dim=1)
    inputs = {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
    planted = torch.zeros_like(ids, dtype=torch.bool)
    planted[0, [0, 3, 2 + n_image + 6 + 5]] = True  # BOS-like token, one sink in each image
    _plant(model, planted)
    with torch.no_grad(), patchattn.patched(model, "var", **_config()):
        fused = model(**inputs).logits
        state = next(s for s in _text_states(model) if s.method_state.active)
        assert torch.equal(state.method_state.sinks, planted)
        rows = var.editable_rows(state.method_state.image, ids.shape[1], None)
        between = slice(2 + n_image, 2 + n_image + 6)
        assert rows[0, between].all() and not rows[0, : 2 + n_image].any()
        monkeypatch.setattr(var, "redistribute", _oracle_redistribute)
        oracle = model(**inputs).logits
    assert max_abs_diff(fused, oracle) <= TOL


def test_targets_and_hooks():
    """Only the patched text layers from first_layer on, except the last, detect and edit, each with one pre-hook
    on its decoder layer; unpatch removes them; the vision tower is not VAR's (non-causal: refused)."""
    model, inputs, _ = _setup("llava")
    layers = model.model.language_model.layers
    before = [len(layer._forward_pre_hooks) for layer in layers]
    patchattn.patch(model, "var", **_config(first_layer=1))
    assert [len(layer._forward_pre_hooks) for layer in layers] == [b + (i == 1) for i, b in enumerate(before)]
    assert all(get_state(m) is None for m in model.model.vision_tower.modules())
    patchattn.unpatch(model)
    assert [len(layer._forward_pre_hooks) for layer in layers] == before
    patchattn.patch(model, "var", **_config(), targets="vision")
    with pytest.raises(NotImplementedError, match="var"):
        model(**inputs)
    patchattn.unpatch(model)


# ---- D_sink as data, and its calibration ---------------------------------------------------------------------
def test_shipped_table_and_lookup():
    table = var.sink_dims_table()
    llava7b = types.SimpleNamespace(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=11008)
    llama3 = types.SimpleNamespace(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336)
    assert var.lookup_sink_dims(table, llava7b) == [1415, 2533]
    assert var.lookup_sink_dims(table, llama3) is None  # another backbone of the same width: not guessed


def test_bad_settings_are_clear():
    with pytest.raises(ValueError, match="sink dimension -1"):
        patchattn.get_config("var", sink_dims=[-1])
    with pytest.raises(ValueError, match="sink-dimension table"):
        patchattn.get_config("var", sink_dims="missing.json")
    with pytest.raises(ValueError, match="budget"):
        patchattn.get_config("var", budget="text")
    model = tiny_model("llava")
    with pytest.raises(ValueError, match=r"\[0, 63\]"):
        patchattn.patch(model, "var", sink_dims=[64])
    with pytest.raises(ValueError, match="lvlm"):
        patchattn.patch(tiny_model("llama"), "var")


def test_calibration_finds_a_planted_dimension(tmp_path):
    model = tiny_model("llava")
    prompts = calibrate_sink_dims.prompts(model, None, 3, 40, seed=0)
    assert all(p[0, 0] == model.config.text_config.bos_token_id for p in prompts)
    assert calibrate_sink_dims.find_sink_dims(model, prompts, first_layer=1)["dims"] == []  # nothing planted
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight[model.config.text_config.bos_token_id, DIM] = 300.0
    found = calibrate_sink_dims.find_sink_dims(model, prompts, first_layer=1)
    assert found["dims"] == [DIM] and found["sink_tokens"] == 3
    # the command writes a table var reads
    folder = tmp_path / "planted"
    model.save_pretrained(folder)
    out = tmp_path / "dims.json"
    command = ["calibrate", "sink-dims", "--model", str(folder), "--out", str(out), "--first-layer", "1",
               "--prompts", "2", "--length", "24"]
    assert cli_main(command) == 0
    table = json.loads(out.read_text())
    assert table["sink_dims"]["llama"][0]["dims"] == [DIM]
    patchattn.patch(model, "var", sink_dims=str(out), tau=4.0, first_layer=0)
    assert get_state(model.model.language_model.layers[0].self_attn).method_state.dims.tolist() == [DIM]
    patchattn.unpatch(model)


@pytest.mark.parametrize("q_len", [40, 1])
def test_triton_kernels_match_the_torch_path(triton_interpreter, q_len):
    """The fused passes on the Triton kernels (interpreter on CPU): the hidden columns' finite bias, the image-block
    lists and the decode kernel (one query row) give the torch path's edit."""
    q, k, v, image, sinks, starts = _call(torch.float32)
    q = q[:, :, -q_len:].contiguous()
    rows = var.editable_rows(image, q_len, starts)
    results = [var.redistribute(q, k, v, image, sinks, rows, scale=q.shape[-1] ** -0.5, starts=starts, backend=b,
                                **SETTINGS) for b in ("torch", "triton")]
    (correction, selected), (triton_correction, triton_selected) = results
    assert selected.any() and torch.equal(selected, triton_selected)
    assert max_abs_diff(torch.where(selected[..., None], correction, 0),
                        torch.where(selected[..., None], triton_correction, 0)) <= 1e-4


@pytest.mark.parametrize("pad", [None, [0, 3]], ids=["plain", "left-padded"])
def test_model_on_the_triton_kernel_matches_the_oracle(triton_interpreter, pad, monkeypatch):
    """Tiny LLaVA end to end with the one-pass kernel on Triton (interpreter on CPU): the oracle's logits."""
    model, inputs, _ = _setup("llava", pad=pad)
    with torch.no_grad(), patchattn.patched(model, "var", backend="triton", **_config()):
        fused = model(**inputs).logits
        assert max(s.stats["selected"] for s in _text_states(model) if s.method_state.active) > 0
        monkeypatch.setattr(var, "redistribute", _oracle_redistribute)
        oracle = model(**inputs).logits
    assert max_abs_diff(fused, oracle) <= 1e-4


def test_calibration_without_massive_activations_writes_nothing(tmp_path, capsys):
    folder, out = tmp_path / "plain", tmp_path / "dims.json"
    tiny_model("llava").save_pretrained(folder)
    assert calibrate_sink_dims.main(["--model", str(folder), "--out", str(out), "--first-layer", "1",
                                     "--prompts", "2", "--length", "24"]) == 1
    assert not out.exists() and "no massive activations" in capsys.readouterr().err
