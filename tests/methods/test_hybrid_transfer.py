"""Attention transfer (LoLCATs' stage 1, ``transfer_coef > 0``) of ``lightning`` / ``hybrid``: each converted layer's
MSE trains that layer's own conversion parameters only, and a few transfer-only steps bring the converted model
closer to the softmax model (issue 23: the first version let every layer's MSE reach the earlier layers through the
residual stream; the summed MSE fell while perplexity rose)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import patchattn
from patchattn.methods import _lightning as lightning_impl
from patchattn.methods import lightning


def _model(layers=4, seed=0):
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_a_layers_transfer_loss_reaches_only_its_own_parameters():
    model = _model()
    ids = torch.randint(3, 128, (2, 40))
    with patchattn.patched(model, "lightning", transfer_coef=1.0, block_size=16):
        model.train()
        model(input_ids=ids)
        losses = lightning_impl.layer_transfer_losses(model)
        assert sorted(losses) == [0, 1, 2, 3]
        params = lightning.conversion_parameters(model)
        for layer, loss in losses.items():
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
            for (name, _), grad in zip(params.items(), grads, strict=True):
                own = f"layers.{layer}." in name
                moved = grad is not None and grad.abs().sum() > 0
                # the feature maps always get a gradient; the gate starts with up = 0, so only its up half does
                if own and "gate_down" not in name:
                    assert moved, (layer, name)
                if not own:
                    assert not moved, f"layer {layer}'s transfer loss reaches {name}"
        model.eval()


def _kl_to_dense(model, dense_logits, ids) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return float(torch.nn.functional.kl_div(logits.log_softmax(-1), dense_logits.log_softmax(-1), log_target=True,
                                            reduction="batchmean"))


def test_transfer_steps_bring_the_converted_model_closer_to_the_softmax_model():
    """Transfer-only steps (Adam on the conversion parameters, as the trainer's aux stage) lower the converted
    model's KL to the softmax model on held-out ids: the transfer stage alone makes a better model.  The q/k
    projections are scaled up so the teacher's attention is peaked (a random model's is nearly uniform)."""
    model = _model()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    gen = torch.Generator().manual_seed(0)
    held = torch.randint(3, 128, (4, 64), generator=gen)
    with torch.no_grad():
        dense = model(input_ids=held).logits
    with patchattn.patched(model, "hybrid", softmax_every=4, transfer_coef=1.0, block_size=16):
        params = lightning.conversion_parameters(model)
        before = _kl_to_dense(model, dense, held)
        optimizer = torch.optim.Adam(params.values(), lr=1e-2)
        model.train()
        for _ in range(40):
            model(input_ids=torch.randint(3, 128, (4, 64), generator=gen))
            loss = lightning.transfer_loss(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        after = _kl_to_dense(model, dense, held)
    assert after < 0.9 * before, (before, after)


def test_transfer_coef_leaves_the_training_forward_and_its_lm_gradients_unchanged():
    """The transfer bookkeeping must not change what the LM stage trains: same loss, same gradients (LoRA-free
    here: the conversion parameters) with and without ``transfer_coef``."""
    ids = torch.randint(3, 128, (2, 40))
    results = []
    for coef in (0.0, 1.0):
        model = _model(layers=2)
        with patchattn.patched(model, "lightning", transfer_coef=coef, block_size=16):
            model.train()
            loss = model(input_ids=ids, labels=ids).loss
            params = lightning.conversion_parameters(model)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            results.append((loss.detach(), [g if g is None else g.detach() for g in grads]))
            model.eval()
    (loss0, grads0), (loss1, grads1) = results
    assert torch.equal(loss0, loss1)
    for g0, g1 in zip(grads0, grads1, strict=True):
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)


def _train_hybrid(tmp_path, name, steps=3):
    from patchattn.train import RunOptions, load_recipe, train_model

    overrides = {"model": "tiny-llama", "steps": steps, "seq_len": 32, "eval_every": 0, "save_every": 0,
                 "eval_chunks": 1, "warmup": 0, "lr": 1e-2, "decode_eval": None, "aux_only_steps": 1,
                 "output_dir": str(tmp_path / name)}
    recipe = load_recipe("hybrid", overrides)
    recipe.patch["softmax_every"] = 2  # the tiny model's 2 layers: one converted, one softmax
    train_model(recipe, RunOptions(progress=False, evaluate=False))
    return [json.loads(line) for line in open(tmp_path / name / "log.jsonl") if '"lm_loss"' in line]


def test_the_transfer_mse_is_computed_only_during_the_transfer_stage(tmp_path, monkeypatch):
    """After ``aux_only_steps`` the trainer ends the transfer stage (``end_transfer``): the LM stage's forwards no
    longer pay a linear pass and a softmax teacher per converted layer, and its losses are unchanged."""
    from patchattn.train import recipe as recipe_module

    calls = []
    real = lightning_impl.transfer_mse
    monkeypatch.setattr(lightning_impl, "transfer_mse", lambda *a, **k: calls.append(1) or real(*a, **k))
    switched = _train_hybrid(tmp_path, "switched")
    assert len(calls) == 1, f"transfer MSE computed in {len(calls)} forwards; only the one transfer step needs it"

    calls.clear()
    monkeypatch.setattr(recipe_module, "AUX_STAGE_ENDS", {})
    monkeypatch.setattr("patchattn.train.run.AUX_STAGE_ENDS", {})
    always = _train_hybrid(tmp_path, "always")
    assert len(calls) == 3  # without the switch every training forward computes it
    assert [row["loss"] for row in switched] == [row["loss"] for row in always]


def test_end_transfer_switches_every_converted_layer_off():
    model = _model(layers=4)
    ids = torch.randint(3, 128, (1, 24))
    with patchattn.patched(model, "hybrid", softmax_every=2, transfer_coef=1.0, block_size=16):
        model.train()
        model(input_ids=ids)
        assert sorted(lightning_impl.layer_transfer_losses(model)) == [0, 2]
        assert lightning_impl.end_transfer(model) == 4  # softmax layers carry the state too
        model(input_ids=ids)
        assert lightning_impl.layer_transfer_losses(model) == {}
        with pytest.raises(ValueError, match="no lightning/hybrid layer"):
            lightning_impl.transfer_loss(model)
        model.eval()
