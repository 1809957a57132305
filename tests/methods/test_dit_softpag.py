"""softpag (HeadHunter / SoftPAG): s=0 is dense exactly, s=1 makes the chosen heads output V exactly and leaves the
others untouched, the blend in between; off outside the perturbed pass; the guidance helper's maths against a
manual computation on a tiny DiT (user loop and pipeline hook); the greedy head search picks the heads a toy
objective favours; ``patchattn calibrate headhunter`` writes a head list softpag loads."""

import json
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from dit_cases import FAMILIES, run, tiny

import patchattn
from patchattn import calibrate
from patchattn.calibrate.headhunter import search_heads
from patchattn.dit import SoftPAGGuidance, guided_noise, perturbation, set_perturbed_heads
from patchattn.methods.softpag import SoftPAGConfig
from patchattn.registry import get_spec
from patchattn.state import PatchContext, PatchState, TokenLayout


def _module(config, layer=0, grid=(1, 3, 4), image=(0, 12), text=()):
    layout = TokenLayout(text_slices=text, grid=grid, image_slice=image)
    module = torch.nn.Module()
    module.patchattn = PatchState(config, layer, "dit", PatchContext(family="test", kind="dit", layout=layout))
    return module


def _call(config, layer=0, cross=False, heads=4, length=12):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, heads, length, 8, generator=gen) for _ in range(3))
    out, _ = get_spec("softpag").forward(_module(config, layer), q, k, v, None, cross_attention=cross)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return out, dense, v.transpose(1, 2)


def test_scale_zero_is_dense_exactly():
    out, dense, _ = _call(SoftPAGConfig(heads=[[0, 1], [0, 3]], scale=0.0, perturb=True))
    assert torch.equal(out, dense)


def test_scale_one_outputs_v_on_the_chosen_heads_and_leaves_the_others():
    out, dense, v = _call(SoftPAGConfig(heads=[[0, 1], [0, 3], [1, 0]], scale=1.0, perturb=True))
    assert torch.equal(out[:, :, [1, 3]], v[:, :, [1, 3]])  # the identity map: each token's own value
    assert torch.equal(out[:, :, [0, 2]], dense[:, :, [0, 2]])  # (1, 0) is another layer's head


def test_a_soft_scale_blends_and_the_perturbation_is_off_by_default():
    out, dense, v = _call(SoftPAGConfig(heads=[[0, 2]], scale=0.25, perturb=True))
    torch.testing.assert_close(out[:, :, 2], 0.75 * dense[:, :, 2] + 0.25 * v[:, :, 2])
    off, dense, _ = _call(SoftPAGConfig(heads=[[0, 2]], scale=0.25))
    assert torch.equal(off, dense)
    cross, dense, _ = _call(SoftPAGConfig(heads=[[0, 2]], perturb=True), cross=True)
    assert torch.equal(cross, dense)  # cross attention has no identity map


def test_bad_heads_are_refused():
    with pytest.raises(ValueError, match=r"\[layer, head\] pairs"):
        SoftPAGConfig(heads=[[0]])
    with pytest.raises(ValueError, match="head 5 of layer 0"):
        _call(SoftPAGConfig(heads=[[0, 5]], perturb=True))
    model, _ = tiny("flux")
    with pytest.raises(ValueError, match="layer index 7"):
        patchattn.patch(model, "softpag", heads=[[7, 0]])


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_perturbs_only_in_the_perturbed_pass_and_unpatches(family):
    model, inputs = tiny(family)
    reference = run(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with patchattn.patched(model, "softpag", **SoftPAGConfig.DENSE_EQUIVALENT, heads=[[0, 0]]):
            assert torch.equal(run(model, inputs), reference)
    patchattn.patch(model, "softpag", heads=[[0, 0], [0, 1]], scale=0.5)
    assert torch.equal(run(model, inputs), reference)  # off: the dense model
    with perturbation(model):
        weak = run(model, inputs)
    assert torch.isfinite(weak).all() and not torch.allclose(weak, reference, atol=1e-5)
    assert torch.equal(run(model, inputs), reference)  # and off again
    patchattn.unpatch(model)
    assert torch.equal(run(model, inputs), reference)


# ---- guidance ------------------------------------------------------------------------------------------------
def _weak(model, inputs, heads, scale):
    """The weak model built by hand: a second patch with perturb=True."""
    with patchattn.patched(model, "softpag", heads=heads, scale=scale, perturb=True):
        return run(model, inputs)


def test_guided_noise_formula():
    c, p, u = torch.tensor([2.0]), torch.tensor([1.5]), torch.tensor([1.0])
    assert guided_noise(c, p, 3.0).item() == pytest.approx(2 + 3 * 0.5)
    assert guided_noise(c, p, 3.0, uncond=u, cfg_scale=4.0).item() == pytest.approx(1 + 4 * 1 + 3 * 0.5)
    with pytest.raises(ValueError, match="both"):
        guided_noise(c, p, 3.0, uncond=u)


def test_guidance_helper_in_a_user_loop_matches_the_manual_computation():
    model, inputs = tiny("sd3")
    heads, scale = [[0, 1], [2, 0]], 0.7
    cond = run(model, inputs)
    uncond_inputs = dict(inputs, encoder_hidden_states=torch.zeros_like(inputs["encoder_hidden_states"]))
    uncond = run(model, uncond_inputs)
    perturbed = _weak(model, inputs, heads, scale)
    manual = uncond + 4.0 * (cond - uncond) + 2.5 * (cond - perturbed)
    with patchattn.patched(model, "softpag", heads=heads, scale=scale), torch.no_grad():
        got = SoftPAGGuidance(model, scale=2.5, cfg_scale=4.0)(inputs, uncond_inputs)
        alone = SoftPAGGuidance(model, scale=2.5)(inputs)
    torch.testing.assert_close(got, manual, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(alone, cond + 2.5 * (cond - perturbed), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="not patched with softpag"):
        SoftPAGGuidance(model)


def test_guidance_hook_on_a_cfg_batch_gives_the_pipeline_the_combined_formula():
    """A pipeline calls the transformer on [uncond; cond] and applies its own CFG; with the hook attached the result
    is uncond + g (cond - uncond) + w (cond - perturbed)."""
    model, inputs = tiny("pixart")  # BATCH = 2: row 0 plays uncond, row 1 cond
    heads, w, g = [[0, 2], [2, 1]], 2.0, 4.5
    both = run(model, inputs)
    cond_only = {k: (v[1:] if torch.is_tensor(v) and v.shape[:1] == (2,) else v) for k, v in inputs.items()}
    perturbed = _weak(model, cond_only, heads, 1.0)
    manual = both[:1] + g * (both[1:] - both[:1]) + w * (both[1:] - perturbed)
    with patchattn.patched(model, "softpag", heads=heads):
        handle = SoftPAGGuidance(model, scale=w, cfg_scale=g).attach(cfg_batch=True)
        hooked = run(model, inputs)
        handle.remove()
        assert torch.equal(run(model, inputs), both)  # detached: the plain model again
    pipeline_cfg = hooked[:1] + g * (hooked[1:] - hooked[:1])
    torch.testing.assert_close(pipeline_cfg, manual, atol=1e-5, rtol=1e-4)


def test_guidance_hook_without_cfg_batch_guides_every_call():
    model, inputs = tiny("flux")
    heads = [[1, 0]]
    cond = run(model, inputs)
    perturbed = _weak(model, inputs, heads, 1.0)
    with patchattn.patched(model, "softpag", heads=heads):
        handle = SoftPAGGuidance(model, scale=3.0).attach()
        hooked = run(model, inputs)
        handle.remove()
    torch.testing.assert_close(hooked, cond + 3.0 * (cond - perturbed), atol=1e-6, rtol=1e-5)


# ---- head search -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [[(0, 1), (2, 0)], [(1, 1), (0, 0)]])
def test_greedy_search_picks_the_heads_the_objective_favours(target):
    """Toy objective: closeness to the weak model whose perturbed heads are ``target``; two greedy rounds must find
    exactly those heads (a different target gives different heads, so the search is not picking by position)."""
    model, inputs = tiny("sd3")  # 3 attention modules x 2 heads
    wanted = _weak(model, inputs, [list(t) for t in target], 1.0)

    def objective(perturbed, reference, sample):
        return -float((perturbed - wanted).pow(2).sum())

    with patchattn.patched(model, "softpag"):
        found = search_heads(model, [inputs], objective, rounds=2, top_k=1)
        assert all(s.method_state.heads is None for s in patchattn.dit.softpag_states(model))  # search undone
    assert sorted(found.chosen) == sorted(target)
    assert len(found.rounds[0]["scores"]) == 6 and len(found.rounds[1]["scores"]) == 5
    assert found.rows() == [[int((l, h) in target) for h in range(2)] for l in range(3)]


def test_set_perturbed_heads_refuses_unknown_layers():
    model, _ = tiny("flux")
    with patchattn.patched(model, "softpag"), pytest.raises(ValueError, match=r"layers \[4\]"):
        set_perturbed_heads(model, [(4, 0)])


def test_calibrate_headhunter_writes_a_head_list_softpag_loads(tmp_path):
    from safetensors.torch import save_file

    model, inputs = tiny("flux")
    model.save_pretrained(tmp_path / "dit")
    two = {f"0.{k}": v for k, v in inputs.items()} | {f"1.{k}": v * 0.5 for k, v in inputs.items()}
    save_file({k: v.contiguous().clone() for k, v in two.items()}, tmp_path / "inputs.safetensors")
    out = tmp_path / "heads.json"
    assert calibrate.main(["headhunter", "--model", str(tmp_path / "dit"), "--inputs", str(tmp_path / "inputs.safetensors"),
                           "--rounds", "2", "--top-k", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    chosen = [tuple(h) for h in data["meta"]["heads"]]
    assert len(chosen) == 2 and data["num_layers"] == 2 and data["num_heads"] == 2
    assert data["meta"]["objective"] == "guidance_strength"
    with patchattn.patched(model, "softpag", head_file=str(out)):
        assert get_spec("softpag").config_cls(head_file=str(out)).all_heads() == tuple(sorted(chosen))
        with perturbation(model):
            from_file = run(model, inputs)
    assert torch.equal(from_file, _weak(model, inputs, [list(c) for c in chosen], 1.0))
    # the default objective picked the head whose perturbation moves the prediction most in round 0
    round0 = {(l, h): s for l, h, s in data["meta"]["rounds"][0]["scores"]}
    assert chosen[0] == max(round0, key=round0.get)
