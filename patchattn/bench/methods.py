"""Speed of every sparse method at Llama-3-8B attention shapes (32 q / 8 kv heads, head_dim 128, bf16), side by
side in one run with SDPA (dense causal) and FlexAttention given the *same* block mask.

For each method (default config) and length: the time to choose the blocks (the method's own selection), the
block-sparse kernel time, their sum, FlexAttention's time on the same lists, and the density; plus decode with
one query per sequence against a long KV cache at batch 1 and 8: the whole step (selection + kernel) timed eagerly
and replayed from a CUDA graph, against SDPA timed both ways.

    python -m patchattn.bench.methods --csv bench/methods/h200.csv          # CUDA GPU
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

import torch

from ..api import parse_methods
from ..kernels.blocksparse import block_sparse_attention, density
from ..masks import BlockGeometry
from ..methods._sparse import block_lists
from ..registry import get_spec
from ..report import environment, format_table
from ..state import PatchContext, PatchState
from .kernel import flex_block_mask, graph_ms, time_ms

FIELDS = ["mode", "T", "B", "layers", "method", "density", "select_ms", "kernel_ms", "total_ms", "flex_ms", "sdpa_ms",
          "speedup_vs_sdpa", "kernel_speedup_vs_sdpa", "vs_flex", "graph_ms", "sdpa_graph_ms",
          "graph_speedup_vs_sdpa", "note"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m patchattn.bench.methods", description=__doc__)
    p.add_argument("--methods", default="streaming,power,s2,moa,duo,hyper,blocktopk,hip",
                   help="';'-separated 'name' or 'name:{json overrides}' (a label 'name@tag:{...}' keeps variants apart)")
    p.add_argument("--prefill", default="32768,131072", help="prefill lengths")
    p.add_argument("--decode", default="131072", help="KV-cache lengths for decode")
    p.add_argument("--decode-batch", default="1,8")
    p.add_argument("--decode-layers", type=int, default=1,
                   help="layers per timed decode step, each with its own cache (times are per layer)")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--csv")
    return p.parse_args(argv)


def _state(name: str, overrides: dict, heads: int = 32, kv_heads: int = 8) -> PatchState:
    config = get_spec(name).config_cls(**overrides)
    state = PatchState(config, layer_index=99, role="text", context=PatchContext())
    if name == "duo":
        # A layer whose share of full (retrieval) heads is the default fraction: in a model the calibrated scores
        # spread them over layers, a benchmark times one layer at the model-wide share (ties: the first heads).
        from ..methods.duo import retrieval_heads

        units = kv_heads if config.kv_heads_together else heads
        state.method_state.retrieval = retrieval_heads(torch.zeros(1, units), config.retrieval_fraction)[0]
    return state


def _select(name, state, q, k):
    """The method's own block lists, built exactly as in a model (dense last block, decode list sizing); never
    taken from the static-pattern cache, so every timed call pays for its selection (at decode the static patterns
    reuse their lists within a key block, ``_sparse.memo_decode_lists``, as they do in a model)."""
    g = BlockGeometry(q.shape[2], k.shape[2], state.config.block_size, state.config.block_size)
    return block_lists(state, g, q, k, get_spec(name).select, static=False)


def prefill_rows(T, methods, with_flex):
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    q = torch.randn(1, 32, T, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, T, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    sdpa = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    rows = []
    for label, name, overrides in methods:
        state = _state(name, overrides)
        idx, cnt = _select(name, state, q, k)
        block = state.config.block_size
        select_ms = time_ms(lambda: _select(name, state, q, k))
        kernel_ms = time_ms(lambda: block_sparse_attention(q, k, v, idx, cnt, block_q=block, block_k=block,
                                                           backend="triton"))
        row = {"mode": "prefill", "T": T, "B": 1, "method": label, "density": density(cnt, T, T, block, block),
               "select_ms": select_ms, "kernel_ms": kernel_ms, "total_ms": select_ms + kernel_ms, "sdpa_ms": sdpa}
        if with_flex:
            try:
                mask = flex_block_mask(idx, cnt, T, block, 32)
                # Flex's default query tile is 128 rows: smaller lists need matching tiles.
                tiles = {"BLOCK_M": block, "BLOCK_N": block} if block < 128 else None
                row["flex_ms"] = time_ms(lambda: flex(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=tiles))
            except Exception as err:
                row["note"] = f"flex: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        rows.append(_ratios(row))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def decode_rows(T, batch, methods, device="cuda", heads=(32, 8), head_dim=128, layers=1):
    """One decode step per method (its selection, as a model runs it every step, then the kernel), timed eagerly and
    replayed from a CUDA graph (how serving loops run decode steps), next to SDPA timed both ways.  With ``layers``
    > 1 a step runs that many layers, each with its own cache and method state, and times are per layer: one graph
    launch per token is then shared by the layers, as in a captured model."""
    q = torch.randn(batch, heads[0], 1, head_dim, device=device, dtype=torch.bfloat16)
    caches = [tuple(torch.randn(batch, heads[1], T, head_dim, device=device, dtype=torch.bfloat16) for _ in range(2))
              for _ in range(layers)]
    k, v = caches[0]
    sdpa = _Layers([lambda k_l=k_l, v_l=v_l: torch.nn.functional.scaled_dot_product_attention(
        q, k_l, v_l, enable_gqa=True) for k_l, v_l in caches])
    sdpa_ms, sdpa_graph = time_ms(sdpa) / layers, graph_ms(sdpa) / layers
    rows = []
    for label, name, overrides in methods:
        per_layer = []
        for k_l, v_l in caches:
            state = _state(name, overrides)
            _select(name, state, q[:, :, :1].expand(-1, -1, 2, -1), k_l)  # a prefill-like call fills the mean cache
            per_layer.append(_decode_steps(name, state, q, k_l, v_l))
        steps = {kind: _Layers([layer[kind] for layer in per_layer]) for kind in per_layer[0]}
        state = per_layer[0][next(iter(steps))].state
        block = state.config.block_size
        # hip searches every refresh_interval steps and reuses the lists in between: average over one cycle.
        weights = {"search": 1, "reuse": state.config.refresh_interval - 1} if "reuse" in steps else {"step": 1}
        eager = {kind: time_ms(fn) / layers for kind, fn in steps.items()}
        graphed = {kind: graph_ms(fn) / layers for kind, fn in steps.items()}
        idx, cnt = steps.get("search", steps.get("step")).layers[0].lists()
        row = {"mode": "decode", "T": T, "B": batch, "layers": layers, "method": label,
               "density": density(cnt, 1, T, block, block), "sdpa_ms": sdpa_ms, "sdpa_graph_ms": sdpa_graph,
               "select_ms": time_ms(lambda: _select(name, state, q, k)),
               "kernel_ms": time_ms(lambda: block_sparse_attention(q, k, v, idx, cnt, block_q=block, block_k=block,
                                                                   backend="triton")),
               "total_ms": _cycle(eager, weights), "graph_ms": _cycle(graphed, weights),
               "note": _sync_note(steps) if q.is_cuda else ""}
        rows.append(_ratios(row))
        print(json.dumps(rows[-1]), flush=True)
    return rows


class _Layers:
    """Calls each layer's step in turn (returns the last output)."""

    def __init__(self, layers):
        self.layers = layers

    def __call__(self):
        return [step() for step in self.layers][-1]


class _Step:
    """A decode step of one method: selection + kernel, with the cache state of a step after the previous one."""

    def __init__(self, name, state, q, k, v, prepare):
        self.name, self.state, self.q, self.k, self.v, self.prepare = name, state, q, k, v, prepare

    def lists(self):
        self.prepare()
        return _select(self.name, self.state, self.q, self.k)

    def __call__(self):
        idx, cnt = self.lists()
        block = self.state.config.block_size
        return block_sparse_attention(self.q, self.k, self.v, idx, cnt, block_q=block, block_k=block,
                                      backend="triton")


def _decode_steps(name, state, q, k, v):
    T = k.shape[2]

    def grown_by_one():
        # The cache grew by one token since the last step: the last block's mean (blocktopk, hip) or bucket counts
        # (hyper, batch of one) are recomputed in place.
        key_means = getattr(state.method_state, "key_means", None)  # blocktopk and hip keep one
        if key_means is not None:
            key_means.length = T - 1
        key_hist = getattr(state.method_state, "key_hist", None)
        if key_hist is not None:
            key_hist.tokens = T - 1

    if name != "hip":
        return {"step": _Step(name, state, q, k, v, grown_by_one)}

    def search():
        grown_by_one()
        state.method_state.decode = None

    def reuse():
        if state.method_state.decode is None:
            _select(name, state, q, k)
        state.method_state.decode.age = 0  # the next call reuses the saved lists

    return {"search": _Step(name, state, q, k, v, search), "reuse": _Step(name, state, q, k, v, reuse)}


def _cycle(times, weights):
    return sum(times[kind] * w for kind, w in weights.items()) / sum(weights.values())


def _sync_note(steps):
    """Whether a step forces a device-to-host sync (which a CUDA graph cannot capture and eager calls pay for)."""
    found = []
    for kind, fn in steps.items():
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        except RuntimeError as err:
            found.append(f"{kind}: host sync ({str(err).splitlines()[0][:80]})")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return "; ".join(found) or "no host sync"


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _ratios(row):
    row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["total_ms"]
    row["kernel_speedup_vs_sdpa"] = row["sdpa_ms"] / row["kernel_ms"]
    if row.get("flex_ms"):
        row["vs_flex"] = row["flex_ms"] / row["kernel_ms"]
    if row.get("graph_ms"):
        row["graph_speedup_vs_sdpa"] = row["sdpa_graph_ms"] / row["graph_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = parse_methods(args.methods)
    whole = [name for _, name, _ in methods if get_spec(name).select is None]
    if whole:  # landmark, dma, lightning: selection and kernel calls inside the attention function, trained state
        print(f"patchattn bench methods times block selectors; {', '.join(whole)} have none (their attention "
              "function runs its own engine calls): time them with `patchattn bench linear`", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("patchattn bench methods needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for T in ints(args.prefill):
        rows += prefill_rows(T, methods, not args.no_flex)
        torch.cuda.empty_cache()
    for T in ints(args.decode):
        for batch in ints(args.decode_batch):
            rows += decode_rows(T, batch, methods, layers=args.decode_layers)
    print(format_table(rows, ["mode", "T", "B", "layers", "method", "density", "select_ms", "kernel_ms", "flex_ms",
                              "sdpa_ms", "speedup_vs_sdpa", "vs_flex", "graph_ms", "graph_speedup_vs_sdpa"]))
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as handle:
            handle.write(f"# {json.dumps(environment())} command: {' '.join(sys.argv)}\n")
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows({k: r.get(k) for k in FIELDS} for r in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
