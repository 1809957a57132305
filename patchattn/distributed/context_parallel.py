"""Context-parallel prefill: a long prompt's query blocks split over the ranks of a process group.

Each rank runs the model on its own tokens (``plan.py``: whole blocks, load-balanced for causal attention), with
their prompt positions as ``position_ids`` so rotary embeddings are the ones a one-process prefill gives.  Every
patched attention layer then fetches the other ranks' keys and values (``exchange``: one all-gather per layer, or
passed around the ring with each chunk computed as soon as the keys it reads have arrived) and runs the patched
method once per local chunk: queries ``[start, stop)`` against keys ``[0, stop)``, which is how every block-sparse
method already reads a call (queries are the last positions of the keys).  The method's selection therefore sees
the same query blocks and key blocks as in one process, and the outputs equal the one-process prefill's.
``dense`` can instead run ring attention proper (``exchange="ring_attention"``, ``ring_attention.py``).

``PatchContext.prefill_tokens`` tells the methods the whole prompt's length, so only the chunk holding the
prompt's last block reads it whole (``last_block_dense``), ``density`` resolves at the whole prompt and ``moa``'s
elastic windows scale with it.

A padded batch (``attention_mask`` with one run of ones per row) is split in a layout where every row's real
tokens come first (``padding.py``), and each sparse chunk runs row group by row group, as ``methods/_rows.py`` does
in one process.  Sliding-window layers run their band per chunk (``window.py``), reading only the keys it reaches.

Inference only (the collectives carry no gradient).  After the prefill, ``gather_cache`` assembles the whole KV
cache on every rank, so decoding continues in one process with the patched model (or on rank 0 only).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..api import get_handle
from ..checks import check_inputs
from ..kernels.blocksparse import block_sparse_attention, blocks_from_mask
from ..masks import BlockGeometry, causal_allowed
from ..methods._rows import clear_caches, group_state
from ..methods._sparse import layer_dense_reason
from ..registry import get_spec
from ..state import get_state
from .padding import RowLayout
from .plan import BALANCES, ShardPlan, plan_shards
from .ring_attention import ring_attention
from .window import window_attention

# Methods whose calls read "queries = the last positions of the keys" through the block-sparse engine (or dense):
# tested to equal the one-process prefill (tests/distributed/test_context_parallel.py).
SUPPORTED_METHODS = ("dense", "blocktopk", "hip", "streaming", "power", "s2", "moa")
EXCHANGES = ("allgather", "ring", "ring_attention")
IMPLEMENTATION = "patchattn_context_parallel"  # the attention implementation a patched model runs during a prefill
DENSE_BLOCK = 128  # chunk alignment for ``dense`` (no block size of its own)
_RUN_KEY = "context_parallel_run"  # PatchContext.extras: the prefill in progress, read by the attention entry


@dataclass
class _Chunk:
    """One contiguous run of a rank's tokens: local ``[local_start, local_stop)`` = prompt ``[start, stop)``."""

    local_start: int
    local_stop: int
    start: int
    stop: int


@dataclass
class _Prefill:
    """One context-parallel forward in progress: what every layer's attention call needs."""

    plan: ShardPlan
    rank: int
    group: object
    exchange: str
    chunks: list[_Chunk]
    gather_index: torch.Tensor  # prompt position -> index in the padded all-gather layout
    owners: torch.Tensor  # [T] rank holding each prompt position
    forward: Callable  # the patched method's attention function
    groups: dict | None = None  # padded batch: rows by real length (real span [0, length) in the split's layout)
    cleared: set = field(default_factory=set)  # ids of the states whose caches this prefill has reset

    def attention(self, module, state, query, key, value, **kwargs):
        """``([B, T_local, Hq, Dv], None)``: this rank's queries against the whole prompt's keys, chunk by chunk."""
        method = type(state.config).method
        check_inputs(method, query, key, value, state)
        window = kwargs.get("sliding_window")
        if id(state) not in self.cleared and state.method_state is not None:
            clear_caches(state.method_state)  # a new sequence: nothing kept from the previous one applies
            self.cleared.add(id(state))
        if self.exchange == "ring_attention" and not window:  # dense only (checked when the ContextParallel is made)
            return ring_attention(self, query, key, value, scaling=kwargs.get("scaling"),
                                  softcap=kwargs.get("softcap"), backend=getattr(state.config, "backend", "auto"),
                                  block=self.plan.block), None
        outs: dict[int, torch.Tensor] = {}

        def compute(i: int, full_k: torch.Tensor, full_v: torch.Tensor) -> None:
            c = self.chunks[i]
            q = query[:, :, c.local_start:c.local_stop]
            first = max(0, c.start - window + 1) if window else 0  # a band reads no key before its window
            k, v = full_k[:, :, first:c.stop], full_v[:, :, first:c.stop]
            if window or self.groups is None or _dense_call(method, state, kwargs):
                # Trailing padding (the split's layout) is after every real query: causality hides it.
                outs[i] = _chunk_attention(self.forward, module, state, method, q, k.contiguous(), v.contiguous(),
                                           kwargs)
            else:
                outs[i] = self._rows_attention(module, state, method, q, k, v, c, kwargs)

        if window:  # whatever the exchange: a band reads only the last window - 1 keys of the chunks before it
            exchange = functools.partial(_all_gather_window_kv, window=window)
        else:
            exchange = _ring_kv if self.exchange == "ring" else _all_gather_kv
        exchange(self, key, value, compute)
        return torch.cat([outs[i] for i in range(len(self.chunks))], dim=1), None

    def _rows_attention(self, module, state, method: str, q, k, v, c: _Chunk, kwargs) -> torch.Tensor:
        """A padded batch's chunk through a sparse method, row group by row group: each group's real queries of the
        chunk against its real keys, with the group's length as the prompt's and its own between-call state (as
        ``_rows.run_by_rows`` in one process); padded query rows are zero."""
        out = q.new_zeros(q.shape[0], q.shape[2], q.shape[1], v.shape[-1])
        previous = state.context.prefill_tokens
        for length, rows in self.groups.items():
            stop = min(c.stop, length)
            if stop <= c.start:
                continue  # this chunk holds only the group's padding
            pick = torch.tensor(rows, device=q.device)
            state.context.prefill_tokens = length
            try:
                with group_state(state, (tuple(rows), "context_parallel")):
                    out[pick, :stop - c.start] = _chunk_attention(
                        self.forward, module, state, method, q[pick, :, :stop - c.start],
                        k[pick, :, :stop].contiguous(), v[pick, :, :stop].contiguous(), kwargs)
            finally:
                state.context.prefill_tokens = previous
        return out


def _dense_call(method: str, state, kwargs) -> bool:
    return method == "dense" or layer_dense_reason(state, kwargs) is not None


def _chunk_attention(forward, module, state, method: str, q, k, v, kwargs) -> torch.Tensor:
    """One chunk through the patched method, ``[B, Tq, Hq, Dv]``; dense calls (the ``dense`` method, a method's
    dense layers) bottom-right aligned here (transformers' SDPA path aligns a shorter query top-left); a
    sliding-window layer's band (queries the last positions of ``k``, which must reach back a window)."""
    if kwargs.get("sliding_window"):
        return window_attention(q, k, v, window=kwargs["sliding_window"], scaling=kwargs.get("scaling"),
                                softcap=kwargs.get("softcap"))
    if _dense_call(method, state, kwargs):
        return offset_causal_attention(q, k, v, scaling=kwargs.get("scaling"), softcap=kwargs.get("softcap"),
                                       backend=getattr(state.config, "backend", "auto"),
                                       block=getattr(state.config, "block_size", DENSE_BLOCK))
    out, _ = forward(module, q, k, v, None, **kwargs)
    return out


def chunk_attention(module, query, key, value, *, prompt_tokens: int, **kwargs) -> torch.Tensor:
    """One chunk of a context-parallel prefill, in this process: ``query`` ``[B, Hq, Tq, D]`` are the prompt positions
    ``[Tk - Tq, Tk)`` of a ``prompt_tokens``-token prompt and ``key``/``value`` its first ``Tk`` positions; runs the
    patched module's method as a rank does and returns ``[B, Tq, Hq, Dv]`` (the rows a one-process prefill of the
    whole prompt gives).  For tests and benchmarks of the chunk semantics without a process group."""
    state = get_state(module)
    if state is None:
        raise ValueError("chunk_attention needs a patched attention module (patchattn.patch(model, method))")
    method = type(state.config).method
    previous, state.context.prefill_tokens = state.context.prefill_tokens, prompt_tokens
    try:
        return _chunk_attention(get_spec(method).forward, module, state, method, query, key, value, kwargs)
    finally:
        state.context.prefill_tokens = previous


def offset_causal_attention(q, k, v, *, scaling=None, softcap=None, backend: str = "auto",
                            block: int = DENSE_BLOCK) -> torch.Tensor:
    """Causal attention of queries that are the last ``Tq`` positions of ``Tk`` keys (bottom-right aligned):
    ``[B, Tq, Hq, Dv]``.  SDPA with torch's lower-right causal bias (flash / memory-efficient kernels on a GPU, no
    mask materialised), as the one-process dense prefill runs SDPA; with soft-capping (Gemma-2), the block-sparse
    engine with every allowed block."""
    if softcap is None:
        from torch.nn.attention.bias import causal_lower_right

        if q.is_cuda and q.shape[1] != k.shape[1]:  # the fused lower-right kernels take equal head counts
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), scale=scaling,
            enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2)
    geometry = BlockGeometry(q.shape[2], k.shape[2], block, block)
    kv_indices, kv_counts = blocks_from_mask(causal_allowed(geometry, q.device)[None, None])
    out = block_sparse_attention(q, k, v, kv_indices, kv_counts, block_q=block, block_k=block, causal=True,
                                 scale=scaling, softcap=softcap, backend=backend)
    return out.transpose(1, 2)


# ---- exchanging keys and values ----------------------------------------------------------------------------------
def _packed(run: _Prefill, key, value) -> torch.Tensor:
    """Keys and values side by side, padded to the longest rank's length: one tensor, one collective."""
    kv = torch.cat([key, value], dim=-1)
    pad = run.plan.max_local_length - kv.shape[2]
    return torch.nn.functional.pad(kv, (0, 0, 0, pad)) if pad else kv.contiguous()


def _all_gather_kv(run: _Prefill, key, value, compute) -> None:
    """One all-gather of every rank's keys and values, reordered into prompt order; then every chunk."""
    kv = _packed(run, key, value)
    world = run.plan.world
    gathered = torch.empty((world, *kv.shape), dtype=kv.dtype, device=kv.device)
    all_gather_stacked(gathered, kv, run.group)
    b, h, width, d = kv.shape
    full = gathered.permute(1, 2, 0, 3, 4).reshape(b, h, world * width, d).index_select(2, run.gather_index)
    full_k, full_v = full.split([key.shape[-1], value.shape[-1]], dim=-1)
    for i in range(len(run.chunks)):
        compute(i, full_k, full_v)


def _all_gather_window_kv(run: _Prefill, key, value, compute, *, window: int) -> None:
    """A sliding-window layer: one all-gather of each rank's chunk tails (their last ``window - 1`` keys and values,
    ``ShardPlan.tails``), placed with the rank's own tokens at their prompt positions; then every chunk, whose band
    ``[start - window + 1, stop)`` they cover.  The other positions stay zero and are never read."""
    kv = torch.cat([key, value], dim=-1)
    plan, device = run.plan, kv.device
    tails = [plan.tails(r, window - 1) for r in range(plan.world)]
    width = max(positions.numel() for positions, _ in tails)
    mine = kv.index_select(2, tails[run.rank][1].to(device))
    mine = torch.nn.functional.pad(mine, (0, 0, 0, width - mine.shape[2])).contiguous()
    gathered = torch.empty((plan.world, *mine.shape), dtype=kv.dtype, device=device)
    all_gather_stacked(gathered, mine, run.group)
    b, h, _, d = kv.shape
    full = kv.new_zeros((b, h, plan.tokens, d))
    for r, (positions, _) in enumerate(tails):
        full.index_copy_(2, positions.to(device), gathered[r][:, :, :positions.numel()])
    _place(run, full, kv, run.rank)
    full_k, full_v = full.split([key.shape[-1], value.shape[-1]], dim=-1)
    for i in range(len(run.chunks)):
        compute(i, full_k, full_v)


def all_gather_stacked(out: torch.Tensor, local: torch.Tensor, group) -> None:
    """``out[r] = rank r's local`` (``out``: contiguous ``[world, *local.shape]``) in one collective (``all_gather_single``, as torch now names
    ``all_gather_into_tensor``)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out.flatten(0, 1), local, group=group)  # the concatenated form: gloo takes no other


def _ring_kv(run: _Prefill, key, value, compute) -> None:
    """Keys and values passed around the ring (``world - 1`` steps, each rank sends what it received last): while a
    step is in flight the rank computes every chunk whose keys ``[0, stop)`` have all arrived."""
    kv = _packed(run, key, value)
    world, rank = run.plan.world, run.rank
    b, h, _, d = kv.shape
    full = kv.new_empty((b, h, run.plan.tokens, d))
    full_k, full_v = full.split([key.shape[-1], value.shape[-1]], dim=-1)
    have = {rank}
    _place(run, full, kv, rank)
    done: set[int] = set()

    def compute_ready():
        for i, c in enumerate(run.chunks):
            if i not in done and set(run.owners[:c.stop].unique().tolist()) <= have:
                compute(i, full_k, full_v)
                done.add(i)

    ranks = dist.get_process_group_ranks(run.group) if run.group is not None else list(range(world))
    send = kv
    for step in range(1, world):
        received = torch.empty_like(kv)
        ops = [dist.P2POp(dist.isend, send, ranks[(rank + 1) % world], group=run.group),
               dist.P2POp(dist.irecv, received, ranks[(rank - 1) % world], group=run.group)]
        requests = dist.batch_isend_irecv(ops)
        compute_ready()  # overlaps the transfer
        for request in requests:
            request.wait()
        source = (rank - step) % world
        _place(run, full, received, source)
        have.add(source)
        send = received
    compute_ready()


def _place(run: _Prefill, full, kv, source: int) -> None:
    """Write rank ``source``'s (padded) local keys and values at their prompt positions."""
    positions = run.plan.positions(source, device=kv.device)
    full.index_copy_(2, positions, kv[:, :, :positions.numel()])


def context_parallel_attention(module, query, key, value, attention_mask, **kwargs):
    """The attention implementation a patched model runs while ``ContextParallel`` prefills (transformers'
    signature): the rank's queries against every rank's keys, through the patched method."""
    state = get_state(module)
    run = state.context.extras.get(_RUN_KEY) if state is not None else None
    if run is None:
        raise RuntimeError(f"{IMPLEMENTATION} runs only inside ContextParallel's prefill call")
    if attention_mask is not None:
        raise NotImplementedError("context_parallel: the model passed an attention mask to a chunk; padding is "
                                  "handled by the ContextParallel call (its attention_mask argument)")
    return run.attention(module, state, query, key, value, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    # Not in transformers' mask registry on purpose: the model then builds no mask (its local causal mask would be
    # wrong for a rank's chunks, and a mask over a long prompt is large); each chunk call is causal by position.
    AttentionInterface.register(IMPLEMENTATION, context_parallel_attention)


_register()


# ---- the entry point ---------------------------------------------------------------------------------------------
@dataclass
class ContextParallel:
    """A patched model's prefill split over a process group (``context_parallel`` makes one).

    Call it like the model on the whole prompt (every rank passes the same ``input_ids``): each rank runs its own
    tokens and gets the model's output for them (``logits`` ``[B, T_local, V]``, in the order of ``positions``).
    ``gather`` assembles a per-token output in prompt order; ``gather_cache`` the whole KV cache.

    Attributes:
        model: the patched transformers model.
        group: the process group (None: the default group).
        balance: ``"zigzag"`` (causal work balanced) or ``"contiguous"``.
        exchange: ``"allgather"`` (one collective per layer), ``"ring"`` (point-to-point steps, compute overlapped)
            or ``"ring_attention"`` (``dense`` only: shards dropped after use, partial outputs merged).
        plan: the latest prefill's split (None before the first call).
        layout: the latest prefill's padding (``padding.RowLayout``; None when no row is padded).
    """

    model: torch.nn.Module
    group: object = None
    balance: str = "zigzag"
    exchange: str = "allgather"
    plan: ShardPlan | None = field(default=None, init=False)
    layout: RowLayout | None = field(default=None, init=False)

    def __post_init__(self):
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}; got {self.balance!r}")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"exchange must be one of {', '.join(EXCHANGES)}; got {self.exchange!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("context_parallel needs torch.distributed initialised (torchrun, or "
                               "dist.init_process_group) before it is made")
        handle = get_handle(self.model)
        if handle is None:
            raise ValueError(f"context_parallel needs a patched model (patchattn.patch(model, method)); supported "
                             f"methods: {', '.join(SUPPORTED_METHODS)}")
        if handle.method not in SUPPORTED_METHODS:
            raise NotImplementedError(f"context_parallel supports {', '.join(SUPPORTED_METHODS)}, not "
                                      f"{handle.method!r}")
        if self.exchange == "ring_attention" and handle.method != "dense":
            raise NotImplementedError(f"exchange='ring_attention' runs the dense method only (a content-based "
                                      f"selection reads every key block first); {handle.method!r} takes "
                                      "'allgather' or 'ring'")
        if handle.adapter_name != "hf":
            raise NotImplementedError("context_parallel supports transformers language models only")
        self._handle = handle

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def block(self) -> int:
        return getattr(self._handle.config, "block_size", DENSE_BLOCK)

    @property
    def positions(self) -> torch.Tensor:
        """``[T_local]`` the positions of this rank's tokens in the latest prefill's split.  Unpadded: prompt
        positions; padded: positions of the layout where each row's real tokens come first (``row_positions``
        gives each row's positions in ``input_ids``)."""
        if self.plan is None:
            raise RuntimeError("no prefill has run yet")
        return self.plan.positions(self.rank)

    def row_positions(self, batch: int) -> torch.Tensor:
        """``[B, T_local]`` where this rank's tokens sit in each row of ``input_ids`` (the order of its outputs)."""
        positions = self.positions
        if self.layout is None:
            return positions[None].expand(batch, -1)
        return self.layout.original_positions(positions)

    def shard(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a whole-prompt tensor (batch on dim 0, tokens on ``dim``)."""
        if self.layout is not None:
            tensor = self.layout.to_internal(tensor, dim)
        return tensor.index_select(dim, self.positions.to(tensor.device))

    def __call__(self, input_ids: torch.Tensor, **kwargs):
        """The model's forward on this rank's tokens of ``input_ids`` ``[B, T]`` (the same on every rank): each
        patched layer reads every rank's keys.  ``attention_mask`` ``[B, T]`` may pad rows (left, right or both: one
        run of ones per row); ``position_ids`` ``[B or 1, T]`` default to ``0..T-1`` as in the model's own forward
        (``generate`` passes ``attention_mask.cumsum(-1) - 1``: pass the same to match it).  Other keyword
        arguments go to the model (``use_cache``, ...)."""
        mask = kwargs.pop("attention_mask", None)
        position_ids = kwargs.pop("position_ids", None)
        if "inputs_embeds" in kwargs:
            raise ValueError("context_parallel takes input_ids, not inputs_embeds")
        batch, tokens = input_ids.shape
        layout = RowLayout.from_mask(mask, (batch, tokens))
        self.split(tokens)
        self.layout = layout
        index = self.row_positions(batch).to(input_ids.device)  # [B, T_local]
        if position_ids is None:
            position_ids = index
        else:
            if position_ids.dim() != 2 or position_ids.shape[1] != tokens:
                raise ValueError(f"context_parallel: position_ids must be [B or 1, {tokens}]; got "
                                 f"{tuple(position_ids.shape)}")
            position_ids = position_ids.expand(batch, -1).gather(1, index)
        run = self._prefill_run(input_ids.device)
        kwargs = self._recording_cache(kwargs)
        with self._running(run, tokens):
            return self.model(input_ids=input_ids.gather(1, index), position_ids=position_ids, **kwargs)

    def _recording_cache(self, kwargs: dict) -> dict:
        """The forward's keyword arguments with a cache whose sliding-window layers keep every local token (a rank's
        last tokens are not the prompt's: ``gather_cache`` cuts the window after gathering)."""
        from transformers import DynamicCache

        name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        use_cache = kwargs.get("use_cache", getattr(self.model.config, "use_cache", False))
        cache = kwargs.get(name)
        if cache is None and use_cache:
            cache = DynamicCache(config=self.model.config)
        for layer in getattr(cache, "layers", ()):
            if getattr(layer, "is_sliding", False):
                if not hasattr(layer, "activate_past_recording"):
                    raise NotImplementedError("context_parallel: this transformers' sliding-window cache layers drop "
                                              "a rank's tokens before they are gathered; prefill with use_cache=False")
                layer.activate_past_recording()
        return {**kwargs, name: cache} if cache is not None else kwargs

    def split(self, tokens: int) -> ShardPlan:
        """Plan a prompt of ``tokens`` tokens over the group (``__call__`` does it; ``attention`` uses the latest)."""
        self.plan = plan_shards(tokens, self.world, self.block, self.balance)
        return self.plan

    def attention(self, module, query, key, value, **kwargs) -> torch.Tensor:
        """One patched attention module's call on this rank's tokens of the latest split, without the rest of the
        model (benchmarks): ``query``/``key``/``value`` ``[B, H, T_local, D]`` as the module computes them;
        returns ``[B, T_local, Hq, Dv]``.  ``kwargs``: the module's (``scaling``, ...)."""
        plan = self._require_plan()
        with self._running(self._prefill_run(query.device), plan.tokens):
            out, _ = context_parallel_attention(module, query, key, value, None, **kwargs)
        return out

    def gather(self, local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's per-token tensor (``local``: this rank's, tokens on ``dim``) in prompt order, on every rank."""
        plan = self._require_plan()
        moved = local.movedim(dim, 0)
        pad = plan.max_local_length - moved.shape[0]
        if pad:
            moved = torch.cat([moved, moved.new_zeros((pad, *moved.shape[1:]))])
        moved = moved.contiguous()
        gathered = torch.empty((plan.world, *moved.shape), dtype=moved.dtype, device=moved.device)
        all_gather_stacked(gathered, moved, self.group)
        full = gathered.flatten(0, 1).index_select(0, plan.gather_index(moved.device)).movedim(0, dim)
        return self.layout.to_original(full, dim) if self.layout is not None else full

    def gather_cache(self, cache):
        """The prefill's KV cache (each layer holds this rank's tokens) made whole, in place, on every rank; returns
        it.  Each patched layer's compressed caches (key-block means, decode lists) are reset, so the first decode
        step rebuilds them from the whole cache.  Decoding then runs without ``ContextParallel``."""
        for layer in cache.layers:
            if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
                continue
            layer.keys = self.gather(layer.keys, dim=2)
            layer.values = self.gather(layer.values, dim=2)
            if getattr(layer, "is_sliding", False):  # what a one-process prefill keeps: the window's last tokens
                first = max(0, layer.keys.shape[2] - layer.sliding_window + 1)
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
                layer.cumulative_length = self.plan.tokens
                layer.record_past = False
        for module in self.model.modules():
            state = get_state(module)
            if state is not None and state.method_state is not None:
                clear_caches(state.method_state)
        return cache

    def _require_plan(self) -> ShardPlan:
        if self.plan is None:
            raise RuntimeError("no prefill has run yet: call the ContextParallel object on the prompt first")
        return self.plan

    def _prefill_run(self, device) -> _Prefill:
        plan, rank = self.plan, self.rank
        chunks, local = [], 0
        for start, stop in plan.chunks[rank]:
            chunks.append(_Chunk(local, local + stop - start, start, stop))
            local += stop - start
        owners = torch.empty(plan.tokens, dtype=torch.long)
        for r in range(plan.world):
            owners[plan.positions(r)] = r
        groups = self.layout.groups() if self.layout is not None else None
        return _Prefill(plan, rank, self.group, self.exchange, chunks, plan.gather_index(device), owners,
                        self._handle.spec.forward, groups)

    @contextlib.contextmanager
    def _running(self, run: _Prefill, tokens: int):
        """Within: the patched configs run ``IMPLEMENTATION``, the context knows the prompt's length and the run."""
        handle = self._handle
        contexts = {id(s.context): s.context for s in map(get_state, self.model.modules()) if s is not None}
        configs = {id(m.config): m.config for m in self.model.modules()
                   if get_state(m) is not None and getattr(m, "config", None) is not None}
        swapped = [c for c in configs.values() if c._attn_implementation_internal == handle.spec.hf_name]
        for c in swapped:
            c._attn_implementation_internal = IMPLEMENTATION
        for context in contexts.values():
            context.prefill_tokens = tokens
            context.extras[_RUN_KEY] = run
        try:
            yield
        finally:
            for c in swapped:
                c._attn_implementation_internal = handle.spec.hf_name
            for context in contexts.values():
                context.prefill_tokens = None
                context.extras.pop(_RUN_KEY, None)


def context_parallel(model, group=None, balance: str = "zigzag", exchange: str = "allgather") -> ContextParallel:
    """Split a patched model's prefill over the ranks of ``group`` (default: the whole world).

    ::

        cp = patchattn.distributed.context_parallel(model, balance="zigzag")
        out = cp(input_ids, use_cache=True)          # every rank: the same prompt; out.logits: its tokens
        logits = cp.gather(out.logits)               # [B, T, V] in prompt order, on every rank
        cache = cp.gather_cache(out.cache)           # the whole cache: decode continues in one process
    """
    return ContextParallel(model, group=group, balance=balance, exchange=exchange)


__all__ = ["EXCHANGES", "IMPLEMENTATION", "SUPPORTED_METHODS", "ContextParallel", "chunk_attention",
           "context_parallel", "offset_causal_attention"]
