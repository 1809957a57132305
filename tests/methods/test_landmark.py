"""``landmark`` (Landmark Attention) against an eager grouped-softmax oracle: forward and gradients (into q, k, v and
the landmark parameters), fp32 / bf16, odd lengths, GQA, queries that are the last rows of the keys; with every
block retrieved the inference path is the training attention; padding, KV-cache decoding, parameters saved /
reloaded, unpatch, the recipe."""

import json
import math
import shutil
import types

import pytest
import torch
from decode_cases import decoded_rows
from torch.utils._python_dispatch import TorchDispatchMode

import patchattn
from patchattn.methods import landmark
from patchattn.testing import left_pad, max_abs_diff, tiny_model


# ---- the oracle: the paper's grouped softmax, row by row ---------------------------------------------------------
def reference_landmark(q, k, v, pool_query, offset, block, top_k, local, scale, softcap=None):
    """Each row (all at once, on materialised scores): one softmax over its local tokens (blocks ``c - local + 1 .. c``) and the landmarks of its
    ``top_k`` best earlier complete blocks; a block's weight is shared by a softmax over the block's own keys.
    The landmark of block n: ``sum_j softmax_j(v_j . u) k_j``, its logit ``q . L * scale (+ softcap) + offset``."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)

    def cap(x):
        return x if softcap is None else softcap * torch.tanh(x / softcap)

    scores = cap(torch.einsum("bhid,bhjd->bhij", q, kr) * scale)
    n_c = tk // block
    marks = []
    for n in range(n_c):
        keys, values = k[:, :, n * block:(n + 1) * block], v[:, :, n * block:(n + 1) * block]
        weights = torch.softmax(torch.einsum("bhjd,hd->bhj", values, pool_query), -1)
        marks.append(torch.einsum("bhj,bhjd->bhd", weights, keys))
    marks = torch.stack(marks, 2) if marks else k.new_zeros(b, hkv, 0, d)
    mark_logits = cap(torch.einsum("bhid,bhnd->bhin", q, marks.repeat_interleave(g, 1)) * scale)
    mark_logits = mark_logits + offset.repeat_interleave(g)[None, :, None, None]
    pos = torch.arange(tk)
    row_pos = torch.arange(tk - tq, tk)
    row_block = row_pos // block
    local_keys = (pos[None] <= row_pos[:, None]) & (pos[None] // block > (row_block - local)[:, None])  # [Tq, Tk]
    candidates = torch.arange(n_c)[None] <= (row_block - local)[:, None]  # [Tq, NC]
    chosen = torch.zeros(b, hq, tq, n_c, dtype=torch.bool)
    if n_c:
        best = mark_logits.masked_fill(~candidates, -math.inf).topk(min(top_k, n_c), -1).indices
        chosen = chosen.scatter(-1, best, True) & candidates
    top = torch.softmax(torch.cat([scores.masked_fill(~local_keys, -math.inf),
                                   mark_logits.masked_fill(~chosen, -math.inf)], -1), -1)
    within = torch.softmax(scores[..., :n_c * block].reshape(b, hq, tq, n_c, block), -1)
    block_weights = (top[..., tk:, None] * within).reshape(b, hq, tq, n_c * block)
    weights = top[..., :tk] + torch.nn.functional.pad(block_weights, (0, tk - n_c * block))
    return weights @ vr


def _state(block, top_k, local, pool_query, offset):
    config = landmark.LandmarkConfig(block_size=block, top_k=top_k, local_blocks=local, backend="torch")
    return types.SimpleNamespace(config=config, landmark_query=pool_query, landmark_offset=offset,
                                 record=lambda **_: None)


def _inputs(dtype, b=2, hq=4, hkv=2, tq=75, tk=75, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, t, d, generator=gen) for h, t in ((hq, tq), (hkv, tk), (hkv, tk)))
    pool_query = torch.randn(hkv, d, generator=gen)
    offset = torch.randn(hkv, generator=gen) + 2
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], pool_query.requires_grad_(), offset.requires_grad_()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("tq,tk,block,top_k,local,softcap", [
    (75, 75, 16, 2, 1, None),       # odd length, inference top-k
    (75, 75, 16, 1 << 30, 1, None),  # every block (the training attention)
    (90, 90, 16, 3, 2, 4.0),        # two local blocks, soft-capped logits
    (7, 83, 16, 2, 1, None),        # a chunk of queries starting mid-block
    (1, 70, 32, 1, 1, None),        # one decode row
])
def test_forward_and_gradients_match_the_oracle(dtype, tol, tq, tk, block, top_k, local, softcap):
    (q, k, v), pool_query, offset = _inputs(dtype, tq=tq, tk=tk)
    state = _state(block, top_k, local, pool_query, offset)
    out = landmark.grouped_landmark_attention(state, q, k, v, 0.25, softcap, top_k)
    grad_out = torch.randn_like(out.float())
    got = torch.autograd.grad((out.float() * grad_out).sum(), (q, k, v, pool_query, offset))

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, pool_query, offset)]
    want_out = reference_landmark(*leaves, block, top_k, local, 0.25, softcap)
    want = torch.autograd.grad((want_out * grad_out.double()).sum(), leaves)
    assert max_abs_diff(out, want_out) <= tol
    for name, g, w in zip(["q", "k", "v", "landmark_query", "landmark_offset"], got, want, strict=True):
        assert max_abs_diff(g, w) <= tol * max(1.0, w.abs().max().item()), name


def test_retrieval_reads_fewer_blocks_and_changes_the_output():
    (q, k, v), pool_query, offset = _inputs(torch.float32, tq=96, tk=96)
    every = landmark.grouped_landmark_attention(_state(16, 99, 1, pool_query, offset), q, k, v, 0.25, None, 99)
    some = landmark.grouped_landmark_attention(_state(16, 1, 1, pool_query, offset), q, k, v, 0.25, None, 1)
    assert max_abs_diff(every[:, :, 32:], some[:, :, 32:]) > 1e-3  # rows with >= 2 earlier blocks
    assert max_abs_diff(every[:, :, :32], some[:, :, :32]) <= 1e-6  # rows with at most one earlier block


# ---- through a model ----------------------------------------------------------------------------------------------
def _trained_like(model, seed=1):
    """Non-trivial landmark parameters (as after training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".patchattn.landmark_" in name:
                p.add_(torch.randn(p.shape, generator=gen))


def _logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_every_block_retrieved_at_inference_is_the_training_attention():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (2, 83))
    with patchattn.patched(model, "landmark", block_size=16, top_k=1 << 30):
        _trained_like(model)
        inference = _logits(model, input_ids=ids)
        model.train()  # (the tiny models have no dropout)
        training = _logits(model, input_ids=ids)
        model.eval()
    with patchattn.patched(model, "landmark", block_size=16, top_k=2):
        _trained_like(model)
        retrieved = _logits(model, input_ids=ids)
    assert max_abs_diff(inference, training) <= 1e-5
    assert max_abs_diff(retrieved, training) > 1e-3


def test_dense_equivalent_reproduces_the_model_and_unpatch_is_exact():
    model = tiny_model("gemma2")  # soft-capped logits
    ids = torch.randint(3, 100, (2, 70))
    before = _logits(model, input_ids=ids)
    names = {n for n, _ in model.named_parameters()}
    with patchattn.patched(model, "landmark", block_size=16, **landmark.LandmarkConfig.DENSE_EQUIVALENT):
        assert max_abs_diff(_logits(model, input_ids=ids), before) <= 1e-5
    with patchattn.patched(model, "landmark", block_size=16):
        _trained_like(model)
        assert max_abs_diff(_logits(model, input_ids=ids), before) > 1e-3
    assert {n for n, _ in model.named_parameters()} == names
    assert torch.equal(_logits(model, input_ids=ids), before)


def test_padded_rows_get_what_they_get_alone():
    model = tiny_model("qwen3")
    inputs = left_pad({"input_ids": torch.randint(3, 100, (2, 77))}, [0, 19])
    with patchattn.patched(model, "landmark", block_size=16, top_k=2):
        _trained_like(model)
        batch = _logits(model, **inputs)
        alone = _logits(model, input_ids=inputs["input_ids"][1:, 19:])
    assert max_abs_diff(batch[1, 19:], alone[0]) <= 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_cached_decoding_equals_the_full_forwards_last_row(dtype, tol):
    model = tiny_model("llama").to(dtype)
    ids = torch.randint(3, 100, (1, 75))
    with patchattn.patched(model, "landmark", block_size=16, top_k=2):
        _trained_like(model)
        full = _logits(model, input_ids=ids)
        assert max_abs_diff(decoded_rows(model, ids, 40), full[:, 39:]) <= tol


def test_generation_of_a_padded_batch_gives_each_row_its_own_tokens():
    model = tiny_model("llama")
    inputs = left_pad({"input_ids": torch.randint(3, 100, (2, 60))}, [0, 13])
    with patchattn.patched(model, "landmark", block_size=16, top_k=1):
        _trained_like(model)
        batch = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        alone = model.generate(input_ids=inputs["input_ids"][1:, 13:], max_new_tokens=6, min_new_tokens=6, do_sample=False,
                               pad_token_id=0)
    assert torch.equal(batch[1, 60:], alone[0, 47:])


def test_recipe_trains_two_steps_and_reloads(tmp_path):
    from patchattn.train import RunOptions, load_recipe, train_model
    from patchattn.train.recipe import recipe_folder

    folder = tmp_path / "landmark"
    shutil.copytree(recipe_folder("landmark"), folder)
    patch = json.loads((folder / "patch.json").read_text())
    assert patch["method"] == "landmark" and patch["top_k"] == 5
    (folder / "patch.json").write_text(json.dumps({**patch, "block_size": 16, "top_k": 1}))
    recipe = load_recipe(str(folder), {"model": "tiny-llama", "steps": 2, "seq_len": 64, "eval_chunks": 1,
                                       "warmup": 1, "save_every": 0, "eval_every": 0, "lr": 5e-2,
                                       "decode_eval": None, "output_dir": str(tmp_path / "run")})
    _, tuned = train_model(recipe, RunOptions(progress=False))
    learned = {n: p.detach().clone() for n, p in tuned.named_parameters() if ".patchattn." in n}
    assert learned
    offsets = [p for n, p in learned.items() if n.endswith("landmark_offset")]
    assert any(not torch.allclose(p, torch.full_like(p, math.log(16))) for p in offsets)  # trained
    ids = torch.randint(3, 100, (2, 70))
    with torch.no_grad():
        want = tuned(input_ids=ids).logits
        model, _ = patchattn.load("tiny-llama", adapter=str(tmp_path / "run"))
        assert torch.equal(model(input_ids=ids).logits, want)
        reloaded = {n: p for n, p in model.named_parameters() if ".patchattn." in n}
    assert len(reloaded) == len(learned)


# ---- inference: the fused kernel (kernels/landmark) against the per-rank engine path (issue 23) --------------------
def _recording_state(block, top_k, local, pool_query, offset, backend):
    state = _state(block, top_k, local, pool_query, offset)
    state.config.backend = backend
    state.recorded = {}
    state.record = lambda **stats: state.recorded.update(stats)
    return state


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("tq,tk,hq,hkv,block,top_k,local,softcap", [
    (75, 75, 4, 2, 16, 2, 1, None),        # odd length
    (7, 83, 4, 2, 16, 2, 1, None),         # queries starting mid-block (alignment rows)
    (1, 75, 4, 2, 16, 3, 1, None),         # one decode row
    (3, 130, 6, 2, 32, 2, 1, None),        # a few decode rows, GQA 3
    (90, 90, 4, 4, 16, 3, 2, 4.0),         # two local blocks, soft-cap, MHA
    (96, 96, 4, 1, 16, 1 << 30, 1, None),  # every block (dense gates)
    (20, 40, 4, 2, 16, 2, 2, None),        # nothing to retrieve: local blocks only
])
def test_fused_inference_equals_the_per_rank_path(triton_target, dtype, tol, tq, tk, hq, hkv, block, top_k, local,
                                                  softcap):
    """The one-launch kernel gives the per-rank path's output (its oracle, kept as ``_per_rank_landmark_attention``)
    and records the same density."""
    (q, k, v), pool_query, offset = _inputs(dtype, b=2, hq=hq, hkv=hkv, tq=tq, tk=tk)
    q, k, v, pool_query, offset = (t.detach().to(triton_target) for t in (q, k, v, pool_query, offset))
    fused = _recording_state(block, top_k, local, pool_query, offset, "triton")
    oracle = _recording_state(block, top_k, local, pool_query, offset, "torch")
    with torch.no_grad():
        got = landmark.grouped_landmark_attention(fused, q, k, v, 0.25, softcap, top_k)
        want = landmark._per_rank_landmark_attention(oracle, q, k, v, 0.25, softcap, top_k,
                                                     landmark.RETRIEVAL_CHUNK_SCORES, "torch")
    assert got.dtype == dtype and got.shape == q.shape
    assert max_abs_diff(got, want) <= tol * max(1.0, want.float().abs().max().item())
    assert torch.equal(fused.recorded["density"], oracle.recorded["density"])


def test_fused_inference_with_every_block_is_the_training_attention(triton_target):
    """``top_k`` >= the number of blocks: the kernel's grouped softmax is the training one."""
    (q, k, v), pool_query, offset = _inputs(torch.float32, tq=83, tk=83)
    q, k, v, pool_query, offset = (t.detach().to(triton_target) for t in (q, k, v, pool_query, offset))
    state = _recording_state(16, 1 << 30, 1, pool_query, offset, "triton")
    with torch.no_grad():
        got = landmark.grouped_landmark_attention(state, q, k, v, 0.25, None, 1 << 30)
        want = landmark.grouped_landmark_training(state, q, k, v, 0.25, None, 1 << 30)
    assert max_abs_diff(got, want) <= 2e-6


def _triton_model_logits(model, backend, **inputs):
    with patchattn.patched(model, "landmark", block_size=16, top_k=2, backend=backend):
        _trained_like(model)
        return _logits(model, **inputs), decoded_rows(model, inputs["input_ids"][:1, -30:], 20)


def test_tiny_models_give_the_same_logits_on_both_paths(triton_target):
    """A padded batch (rows run alone) and cached decoding through a tiny Llama (GQA): the fused kernel's logits are
    the per-rank path's."""
    model = tiny_model("llama").to(triton_target)
    inputs = left_pad({"input_ids": torch.randint(3, 100, (2, 77))}, [0, 19])
    inputs = {name: t.to(triton_target) for name, t in inputs.items()}
    fused, fused_steps = _triton_model_logits(model, "triton", **inputs)
    oracle, oracle_steps = _triton_model_logits(model, "torch", **inputs)
    assert max_abs_diff(fused, oracle) <= 1e-5
    assert max_abs_diff(fused_steps, oracle_steps) <= 1e-5


def _inference_counts(top_k, backend="triton"):
    (q, k, v), pool_query, offset = _inputs(torch.float32, b=1, hq=2, hkv=1, tq=160, tk=160)
    state = _recording_state(16, top_k, 1, pool_query.detach(), offset.detach(), backend)
    with torch.no_grad(), _OpCounter() as counter:
        landmark.grouped_landmark_attention(state, q.detach(), k.detach(), v.detach(), 0.25, None, top_k)
    return counter.ops, counter.syncs


def test_inference_ops_do_not_grow_with_the_lists_and_never_sync(triton_target):
    """The per-rank path made one engine call per rank of the widest list (plus the mix's weights) and read the
    lists' width on the host: 775 / 843 / 843 operators and 2 host syncs at top_k 1 / 3 / 5 here (lists of 8 / 9 /
    9 entries).  The fused path runs 181 whatever the lists, and never syncs."""
    counts = {top_k: _inference_counts(top_k) for top_k in (1, 3, 5)}
    assert len({ops for ops, _ in counts.values()}) == 1, counts
    assert all(syncs == 0 for _, syncs in counts.values()), counts


# ---- training cost: no per-block work, no host syncs (issue 23) ---------------------------------------------------
class _OpCounter(TorchDispatchMode):
    """Counts the aten operators run (forward and backward) and the host syncs among them (``.item()``, ``int()``)."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs = 0, 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        self.ops += 1
        self.syncs += func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)
        return func(*args, **(kwargs or {}))


def _training_call_counts(block, length=256):
    (q, k, v), pool_query, offset = _inputs(torch.float32, b=1, tq=length, tk=length)
    state = _state(block, 1 << 30, 1, pool_query, offset)
    with _OpCounter() as counter:
        out = landmark.grouped_landmark_attention(state, q, k, v, 0.25, None, 1 << 30)
        out.sum().backward()
    return counter.ops, counter.syncs


def test_training_ops_do_not_grow_with_the_number_of_blocks_and_never_sync():
    """The grouped softmax with gradients used to call the engine once per earlier block (each with its own mask
    building, gathers and syncs): ~9 s a step on an H200.  Now 4, 8 or 16 blocks cost the same operators."""
    counts = {block: _training_call_counts(block) for block in (64, 32, 16)}
    assert len({ops for ops, _ in counts.values()}) == 1, counts
    assert all(syncs == 0 for _, syncs in counts.values()), counts


@pytest.mark.parametrize("tq,tk", [(75, 75), (7, 83)])
def test_training_chunks_of_rows_match_the_oracle(monkeypatch, tq, tk):
    """Chunks of query rows that start mid-block and stop before the incomplete last block give the oracle's
    attention and gradients."""
    monkeypatch.setattr(landmark, "TRAINING_CHUNK_SCORES", 2 * 4 * tk * 5)  # 5 rows a chunk
    (q, k, v), pool_query, offset = _inputs(torch.float32, tq=tq, tk=tk)
    out = landmark.grouped_landmark_attention(_state(16, 2, 2, pool_query, offset), q, k, v, 0.25, None, 2)
    got = torch.autograd.grad(out.sum(), (q, k, v, pool_query, offset))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, pool_query, offset)]
    want_out = reference_landmark(*leaves, 16, 2, 2, 0.25)
    want = torch.autograd.grad(want_out.sum(), leaves)
    assert max_abs_diff(out, want_out) <= 2e-5
    for g, w in zip(got, want, strict=True):
        assert max_abs_diff(g, w) <= 2e-5 * max(1.0, w.abs().max().item())
