"""``blocktopk`` — block top-k attention (Kinetics' block top-k; the routing of MoBA and BiFormer).

Keys are mean-pooled per block (a compressed key cache, updated incrementally while decoding); each key block is
scored against the best query row of the query block (``score="max"``; ``"mean"`` pools the queries too, as
Kinetics and MoBA do); each query block and head (``per_head``; or once per GQA group) keeps the best-scoring
key blocks of its causal past until their estimated share of the softmax mass reaches ``mass`` (at most
``top_k``), plus the sink block(s) and its ``local_blocks`` nearest blocks.  Recomputed on every call, so
decoding re-selects as the cache grows (Kinetics selects per decode step, too).  A decode step with a mask (a static
cache, a padded batch) runs on the device (``decode_top_k_rows``: no host read, it compiles whole), each row
selecting among its own blocks from a compressed key cache kept per row (``_shared.RowMeans``).

Defaults (64-token blocks, per head, max-row scores, mass 0.97 capped at 24 blocks) come from a sweep on
SmolLM2 at 8k tokens: +4.6% perplexity at 21.8% density, where a fixed top-14 gave +7.6% at 24.7%
(bench/quality/).

On diffusion transformers (``methods/_dit_routing.py``) it is BiFormer's region routing, non-causal: the latent grid
in 2D/3D tiles of ``block_size`` tokens, tiles scored by mean-pooled query . mean-pooled key (``score`` is not used:
a DiT has no causal row to take a maximum over cheaply), each query tile reads its own tile and up to ``top_k``
others (``mass`` as above; ``sink_blocks``, ``local_blocks``, ``last_block_dense`` and the decode fields are LLM-only),
text tokens of joint attention read and are read by everything; cross attention stays dense; the DiT schedule fields
(dense first/last denoising steps, ``dense_layers``) apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..config import option
from ..kernels.blockselect import max_list_width, prefill_block_choice, prefill_block_scores, prefill_block_select
from ..masks import BlockGeometry
from ._budget import budget_applied, capped_rows, closest_budget, pattern_density
from ._shared import KeyMeansState, block_means, decode_lists, decode_rows_lists, key_block_means, mark_row_means_stale
from ._dit import DiTScheduleConfig, dense_call, dit_call, runs_dense
from ._dit_routing import routed_tile_attention
from ._sparse import LAST_BLOCK_DENSE_HELP, SparseConfig, reads_last_block_whole, register_sparse_method


@dataclass(kw_only=True)
class BlockTopKConfig(SparseConfig, DiTScheduleConfig):
    top_k: int = option(24, "content-selected key blocks per query block (the cap when mass < 1)", min=0)
    sink_blocks: int = option(1, "initial blocks always read", min=0)
    local_blocks: int = option(2, "nearest blocks always read (includes the diagonal block)", min=1)
    mass: float = option(0.97, "adaptive budget: keep the best blocks until their estimated share of the softmax "
                         "mass reaches this (1.0 = always top_k; top_k stays the cap)", min=0.0, max=1.0)
    decode_mass: float = option(1.0, "the mass budget while decoding (one query row per step): 1.0 reads the top_k "
                                "cap, which costs a few blocks of bandwidth per step and keeps copied answers intact",
                                min=0.0, max=1.0)
    last_block_dense: bool = option(True, LAST_BLOCK_DENSE_HELP)
    per_head: bool = option(True, "select per query head (better quality); False shares one selection per GQA "
                            "group, so the group reads each KV block once")
    fused_scores: bool = option(True, "prefill 'max' scores from the fused Triton kernel (kernels/blockselect) instead "
                                "of the chunked torch products: same lists on the H200, selection at 128k 29.9 -> 21.0 "
                                "ms (bench/methods/RESULTS.md, run 6); the torch backend always uses the torch path")
    fused_select: bool = option(True, "prefill choice from the scores straight to block lists in one Triton kernel "
                                "(kernels/blockselect) instead of torch top-k, masks and lists; the torch backend "
                                "always uses the torch path")
    score: str = option("max", "block score: 'mean' (pooled query . pooled key, as Kinetics/MoBA) or 'max' (best "
                        "query row of the block and GQA group . pooled key)", choices=("mean", "max"))

    DENSE_EQUIVALENT: ClassVar[dict] = {"top_k": 1 << 30, "mass": 1.0, "decode_mass": 1.0}
    DENSITY_FIELDS: ClassVar[tuple] = ("top_k", "mass", "decode_mass")

    def fields_for_density(self, density: float, geometry: BlockGeometry) -> dict:
        """The top-k whose rows read ``density``: row ``i`` reads ``min(i + 1, sinks + local + top_k)`` blocks (``mass`` 1.0, so exactly), the
        last one all with ``last_block_dense``; closed form."""
        n, forced = geometry.n_k, self.sink_blocks + self.local_blocks

        def reads(k):
            return pattern_density(capped_rows(n, forced + k), min(n, forced + k), n, self.last_block_dense)

        return {"top_k": closest_budget(reads, density, 0, n), "mass": 1.0, "decode_mass": 1.0}

    def max_blocks_per_row(self, n_k: int) -> int:
        return max_list_width(n_k, self.top_k, self.sink_blocks, self.local_blocks)


@dataclass
class BlockTopKState(KeyMeansState):
    """The compressed key cache (``key_means``), updated incrementally while decoding; on a DiT, the routing plans
    of the grids this module has seen (``tile_plans``: permutation and tile token counts, by grid and layout)."""

    tile_plans: dict = field(default_factory=dict)




def block_scores(query, k_means, g: BlockGeometry, mode: str, per_head: bool = False,
                 backend: str = "torch", fused: bool = False) -> torch.Tensor:
    """``[B, H, NQ, NK]`` estimated relevance of each key block to each query block; H is the number of KV heads
    (one selection shared by each GQA group) or, with ``per_head``, of query heads.  Entries after a query block's
    causal diagonal are unspecified (the caller masks them)."""
    b, hq, _, d = query.shape
    hkv = k_means.shape[1]
    if mode == "max":
        return prefill_block_scores(query, k_means, block_q=g.block_q, block_k=g.block_k, kv_len=g.kv_len,
                                    per_head=per_head, backend=backend if fused and g.n_q > 1 else "torch")
    q_means = block_means(query, g.block_q).view(b, hkv, hq // hkv, g.n_q, d)
    scores = q_means @ k_means.float()[:, :, None].transpose(-1, -2)
    return scores.flatten(1, 2) if per_head else scores.mean(dim=2)


def select_top_k(g: BlockGeometry, query, key, state):
    config = state.config
    mark_row_means_stale(state)
    if g.q_len == 1:
        return decode_lists(query, key, state, config.decode_mass)
    k_means = key_block_means(state, key, g.block_k, g.q_len)
    raw = block_scores(query, k_means, g, config.score, config.per_head, config.backend,
                       config.fused_scores)  # [B, H, NQ, NK]
    choice = dict(q_len=g.q_len, block_q=g.block_q, block_k=g.block_k, kv_len=g.kv_len, top_k=config.top_k,
                  sink_blocks=config.sink_blocks, local_blocks=config.local_blocks, mass=config.mass,
                  head_dim=query.shape[-1])
    if config.fused_select:
        dense_last = reads_last_block_whole(config, g, state.context.prefill_tokens)
        return prefill_block_select(raw, **choice, last_block_dense=dense_last, backend=config.backend)
    return prefill_block_choice(raw, **choice)  # a mask: the dense last block and the lists come from _sparse


def decode_top_k_rows(rows, query, key, state):
    """A decode step over rows of different lengths (a static cache, a padded batch), on the device: each row's
    choice among its own blocks, from the row decode's compressed key cache (``_shared.RowMeans``).  ``density``
    is resolved at the cache's capacity (the longest row), not at each row's length."""
    with budget_applied(state, rows.geometry()):
        return decode_rows_lists(rows, query, key, state, state.config.decode_mass)


def blocktopk_dit(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, is_causal=False,
                  cross_attention=False, enable_gqa=False, **kwargs):
    """A diffusion transformer's call: routed tiles on the latent grid (self/joint attention), dense otherwise."""
    state = module.patchattn
    config: BlockTopKConfig = state.config
    call = dit_call(state, query, cross_attention)
    if runs_dense(config, call, "blocktopk"):
        return dense_call(state, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                          is_causal=is_causal, enable_gqa=enable_gqa)
    if dropout:
        raise NotImplementedError("patchattn blocktopk: attention dropout is not supported (the engine has none); "
                                  "set the model's attention dropout to 0")
    top_k, mass = config.top_k, config.mass
    if config.density is not None:  # the budget knob: that share of the image tiles, own tile included
        tiles = math.ceil(call.n_image / config.block_size)
        top_k, mass = max(0, round(config.density * tiles) - 1), 1.0
    out = routed_tile_attention(query, key, value, attention_mask, call, plans=state.method_state.tile_plans,
                                top_k=top_k, mass=mass,
                                block=config.block_size, scaling=scaling, backend=config.backend, record=state.record)
    if out is None:  # every tile kept: the model's own attention, exactly
        return dense_call(state, query, key, value, attention_mask, scaling=scaling, enable_gqa=enable_gqa)
    return out, None


blocktopk_attention = register_sparse_method(
    "blocktopk",
    config=BlockTopKConfig,
    paper="Sadhukhan et al., Kinetics: Rethinking Test-Time Scaling Laws (block top-k attention), arXiv 2506.05333; "
    "routing as in MoBA (arXiv 2502.13189)",
    select=select_top_k,
    decode_rows=decode_top_k_rows,
    state_cls=BlockTopKState,
    static=False,
    doc="Top-k key blocks per query block by mean-pooled scores, plus sink and local blocks.",
    dit_forward=blocktopk_dit,
)
