"""Block selection as the methods use it (``blocktopk``, ``hip``): the compressed key cache, decode steps against a
fresh selection, the fused (Triton) and mask (torch) prefill paths choosing the same blocks, and the methods
benchmark's decode rows.  The kernels themselves are tested against their references in tests/kernels."""
import pytest
import torch
from select_cases import SELECT_CASES, select_case_id

from patchattn.kernels.blocksparse import mask_from_blocks


def test_blocktopk_decode_steps_keep_the_key_cache_exact():
    """Token-by-token decoding (the cache grows by one row per step, across block starts) selects what a fresh
    selection without any cached means selects, and leaves the exact block means in the cache."""
    import patchattn
    from patchattn.masks import BlockGeometry
    from patchattn.methods.blocktopk import block_means, select_top_k
    from patchattn.state import PatchContext, PatchState

    torch.manual_seed(1)
    config = patchattn.get_config("blocktopk", block_size=16, top_k=3)
    state = PatchState(config, 0, "text", PatchContext())
    q, k = torch.randn(1, 4, 40, 32) * 3, torch.randn(1, 2, 120, 32)
    select_top_k(BlockGeometry(40, 94, 16, 16), q, k[:, :, :94], state)  # prefill fills the cache
    for t in range(95, 100):  # 97 starts a block
        got = select_top_k(BlockGeometry(1, t, 16, 16), q[:, :, -1:], k[:, :, :t], state)
        fresh_state = PatchState(config, 0, "text", PatchContext())
        want = select_top_k(BlockGeometry(1, t, 16, 16), q[:, :, -1:], k[:, :, :t], fresh_state)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), t
        torch.testing.assert_close(state.method_state.key_means.means, block_means(k[:, :, :t], 16))


def test_key_means_are_stored_in_the_keys_dtype_and_summed_in_fp32():
    """The compressed key cache of a bf16 model is bf16 (half the bytes a decode step's scoring reads) and equals
    the fp32 block means rounded once, also after decode steps that update it in place."""
    import patchattn
    from patchattn.methods.blocktopk import block_means, key_block_means
    from patchattn.state import PatchContext, PatchState

    torch.manual_seed(2)
    state = PatchState(patchattn.get_config("blocktopk", block_size=16), 0, "text", PatchContext())
    k = (torch.randn(1, 2, 100, 32) * 3 + 40).to(torch.bfloat16)  # large offset: bf16 sums would drift
    for t, q_len in ((90, 90), (91, 1), (97, 1)):
        means = key_block_means(state, k[:, :, :t], 16, q_len)
        assert means.dtype == torch.bfloat16
        assert torch.equal(means, block_means(k[:, :, :t], 16).to(torch.bfloat16)), t



def test_blocktopk_decode_lists_match_its_prefill_choice_for_the_last_row():
    """The decode path (lists straight from decode_block_topk) picks what the general (mask) path picks for a
    one-row query block: the same scores, forced blocks and mass rule."""
    import patchattn
    from patchattn.masks import BlockGeometry
    from patchattn.methods.blocktopk import select_top_k
    from patchattn.state import PatchContext, PatchState

    torch.manual_seed(0)
    state = PatchState(patchattn.get_config("blocktopk", block_size=16, top_k=3, mass=0.9, fused_select=False), 0,
                       "text", PatchContext())  # the mask path, whatever backend "auto" resolves to
    q, k = torch.randn(1, 4, 2, 32) * 3, torch.randn(1, 2, 150, 32)
    # Two query rows with the same content: a one-block prefill scored by its best row (= that row).
    two = select_top_k(BlockGeometry(2, 150, 16, 16), q[:, :, -1:].expand(-1, -1, 2, -1), k, state)
    idx, counts = select_top_k(BlockGeometry(1, 150, 16, 16), q[:, :, -1:], k, state)
    assert torch.equal(mask_from_blocks(idx, counts, two.shape[-1]), two)



@pytest.mark.gpu
@pytest.mark.parametrize("method", ["blocktopk", "hip", "streaming"])
def test_decode_step_has_no_host_sync_and_replays_from_a_cuda_graph(method):
    """A method's whole decode step (selection + kernel) runs without a device-to-host sync, so a CUDA graph can
    capture it; the replay reproduces the eager output."""
    from patchattn.bench.methods import _decode_steps, _select, _state

    torch.manual_seed(0)
    q = torch.randn(2, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 5000, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    state = _state(method, {})
    _select(method, state, q.expand(-1, -1, 2, -1), k)
    for step in _decode_steps(method, state, q, k, v).values():
        eager = step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)



@pytest.mark.parametrize("per_head", [True, False])
def test_blocktopk_prefill_selection_is_the_same_with_the_fused_scores(per_head, triton_target):
    import patchattn
    from patchattn.masks import BlockGeometry
    from patchattn.methods.blocktopk import select_top_k
    from patchattn.state import PatchContext, PatchState

    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 300, 32, generator=gen) * 2, torch.randn(1, 2, 300, 32, generator=gen)
    g = BlockGeometry(300, 300, 16, 16)
    masks = {}
    for backend in ("torch", "triton"):
        config = patchattn.get_config("blocktopk", block_size=16, top_k=4, per_head=per_head, backend=backend,
                                      fused_scores=True, fused_select=False)  # masks from both (lists: next test)
        state = PatchState(config, 0, "text", PatchContext())
        masks[backend] = select_top_k(g, q.to(triton_target), k.to(triton_target), state).cpu()
    assert torch.equal(masks["triton"], masks["torch"])





@pytest.mark.parametrize("case", SELECT_CASES, ids=select_case_id)
def test_blocktopk_prefill_lists_from_the_select_kernel_match_the_torch_choice(case, triton_target):
    """Scores -> lists in one Triton program per query block (sink + local, then the top-k or the mass budget, the
    dense last block) keeps the same blocks as the torch top-k, masks and lists."""
    import patchattn
    from patchattn.kernels.blocksparse import mask_from_blocks
    from patchattn.masks import BlockGeometry
    from patchattn.methods._sparse import mask_lists
    from patchattn.methods.blocktopk import select_top_k
    from patchattn.state import PatchContext, PatchState

    tq, tk, block, per_head, top_k, mass, last = case
    gen = torch.Generator().manual_seed(tq + tk + top_k)
    q, k = torch.randn(1, 4, tq, 32, generator=gen) * 2, torch.randn(1, 2, tk, 32, generator=gen)
    g = BlockGeometry(tq, tk, block, block)
    masks = {}
    for fused in (False, True):
        config = patchattn.get_config("blocktopk", block_size=block, top_k=top_k, mass=mass, per_head=per_head,
                                      last_block_dense=last, backend="triton", fused_select=fused)
        state = PatchState(config, 0, "text", PatchContext())
        chosen = select_top_k(g, q.to(triton_target), k.to(triton_target), state)
        idx, cnt = chosen if isinstance(chosen, tuple) else mask_lists(config, g, chosen, triton_target)
        assert isinstance(chosen, tuple) == fused
        masks[fused] = mask_from_blocks(idx.cpu(), cnt.cpu(), g.n_k)
        assert torch.equal(cnt.cpu(), masks[fused].sum(-1, dtype=torch.int32)), "counts match the listed blocks"
    assert torch.equal(masks[True], masks[False])



@pytest.mark.parametrize("layers", [1, 2])
def test_methods_benchmark_decode_rows_run_every_method_step(triton_target, monkeypatch, layers):
    """The decode part of `patchattn bench methods` end to end at a small size, timers replaced by one call each:
    every method's step (selection + kernel) runs, hip's search and reuse steps both, once per layer with the
    layer's own state, and the row has its per-layer ratios."""
    import patchattn.bench.methods as bench

    selected = []
    real_select = bench._select
    # The states themselves are kept (not their ids): a freed state's id can be reused by the next method's state.
    monkeypatch.setattr(bench, "_select", lambda name, state, *a: selected.append(state) or real_select(
        name, state, *a))
    monkeypatch.setattr(bench, "time_ms", lambda fn: (fn(), 2.0)[1])
    monkeypatch.setattr(bench, "graph_ms", lambda fn: (fn(), 1.0)[1])
    rows = bench.decode_rows(300, 2, bench.parse_methods("streaming,blocktopk,hip"), device=triton_target,
                             heads=(4, 2), head_dim=16, layers=layers)
    assert [r["method"] for r in rows] == ["streaming", "blocktopk", "hip"]
    for row in rows:
        assert 0 < row["density"] <= 1 and row["graph_speedup_vs_sdpa"] == 1.0 and row["speedup_vs_sdpa"] == 1.0
        assert row["layers"] == layers and row["sdpa_graph_ms"] == 1.0 / layers
    assert len({id(state) for state in selected}) == 3 * layers  # a state per method and layer
