"""``paint`` — PAINT / "Fixing Imbalanced Attention": boost the informed image tokens for the generated token.

Arif et al., "Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language Model"
(v1; later "PAINT: Paying Attention to INformed Tokens to Mitigate Hallucination in LVLM"), arXiv 2501.12206;
follows the released code (hasanar1f/PAINT, ``modPAI``), built on PAI (ECCV 2024).

**Token selection, once per image, from the vision tower's own attention.**

* *Local* tokens: the top ``local_ratio`` (25 %) of the image's patches by CLS-to-patch attention (summed over
  heads) in the tower's first layer (``local_layer = 0``).
* *Summary* tokens: the IQR outliers (``> Q3 + 1.5 IQR``) of the CLS-to-patch attention in the penultimate layer
  (``summary_layer = -2``, the layer LLaVA reads its features from).  Local tokens that are summary tokens are
  dropped from the local set.

The scores are captured by ``install``: each of those vision attention modules gets a private copy of its config
whose attention implementation is a capture function that computes the CLS row (``O(N)`` per head) and then calls
the module's own implementation unchanged; ``unpatch`` puts the shared config back.  A tower without a CLS token
(Qwen2-VL, Gemma 3's SigLIP) scores each patch by the attention it *receives*, averaged over all query patches
(the attention matrix's column means, ``kernels.received``: no ``N x N`` tensor); the scores follow the connector
onto the image tokens (Qwen2-VL merges ``spatial_merge_size^2`` consecutive patches, Gemma 3 average-pools the patch
grid, Idefics3 / SmolVLM pixel-shuffle each ``scale_factor x scale_factor`` block of patches into one token: its
score is the block's mean), as the features do.  With Idefics3's image splitting each crop (and the global image)
is one tower image, scored on its own.  Qwen2.5-VL's tower attends in windows except in its full-attention layers:
the scores come from those (``local_layer`` and ``summary_layer`` count them), and are put back from the tower's
window order into image order.

**Logit edit** in the language model's layers ``[start_layer, end_layer)`` (2 .. L-1), on the last query row of
every call (the prefill's last token and each decode step, as the released code edits ``attn_weights[:, :, -1]``):
``s_j <- s_j + alpha |s_j|`` on local tokens (0.7), ``s_j + beta |s_j|`` on summary tokens (0.3); all heads alike,
as in the code.  ``heads="visual"`` is the v1 abstract's head-specific variant (not in the code): each head's
``alpha, beta`` times its share of the row's attention on the image over the mean share of the heads.  Every other
row runs fused (SDPA); the last row is recomputed exactly (``methods/_lastrow``).  ``alpha = beta = 0`` is dense.
"""

from __future__ import annotations

import copy
import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..config import MethodConfig, option
from ..kernels.received import received_attention
from ..registry import register_method
from ..state import MethodState, PatchState
from ._heads import dense_call, head_counts
from ._lastrow import compute_dtype, edited_last_row, last_row
from ._perforward import per_forward

CAPTURE_NAME = "paint_vision_capture"  # the capture's name in transformers' attention registry
EXTRAS_KEY = "paint"
HEAD_MODES = ("uniform", "visual")
SCORES = ("auto", "cls", "received")
NOT_ADOPTED = ("patchattn paint: this model was loaded with attn_implementation='patchattn_paint', so no hook reads "
               "the vision tower and it runs dense; call patchattn.get_handle(model) (or patchattn.patch) once after "
               "loading")


@dataclass(frozen=True)
class TokenMap:
    """How one family's vision tower patches become image tokens.

    ``cls``: the tower has a CLS token first (CLIP); ``merge``: consecutive patches merged per token (Qwen2-VL's
    ``spatial_merge_size^2``); ``pool``: image tokens per image after average-pooling a square patch grid (Gemma 3;
    Idefics3 / SmolVLM, whose pixel shuffle groups ``scale_factor^2`` patches per token);
    ``windowed``: the tower sees each image's merge groups in window order (Qwen2.5-VL), so its token scores are put
    back in image order; ``layers``: the tower layers ``local_layer`` / ``summary_layer`` count (None: all; Qwen2.5-VL:
    its full-attention layers, the only ones whose attention spans the whole image).
    """

    cls: bool = False
    merge: int = 1
    pool: int | None = None
    windowed: bool = False
    layers: tuple[int, ...] | None = None


def _llava(config) -> TokenMap:
    return TokenMap(cls=True)


def _qwen2_vl(config) -> TokenMap:
    return TokenMap(merge=config.vision_config.spatial_merge_size ** 2)


def _gemma3(config) -> TokenMap:
    return TokenMap(pool=config.mm_tokens_per_image)


def _qwen2_5_vl(config) -> TokenMap:
    vision = config.vision_config
    return TokenMap(merge=vision.spatial_merge_size ** 2, windowed=True, layers=tuple(vision.fullatt_block_indexes))


def _idefics3(config) -> TokenMap:
    # The connector's pixel shuffle concatenates each scale_factor x scale_factor block of the (square) patch grid
    # into one token, row-major over the blocks: the same grouping as average-pooling the grid by scale_factor.
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    return TokenMap(pool=(side // config.scale_factor) ** 2)


TOKEN_MAPS = {"llava": _llava, "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "gemma3": _gemma3,
              "idefics3": _idefics3, "smolvlm": _idefics3}


@dataclass(kw_only=True)
class PaintConfig(MethodConfig):
    alpha: float = option(0.7, "logit boost c of local tokens: s + c|s| (paper code: 0.7)", min=0.0)
    beta: float = option(0.3, "logit boost of summary tokens (paper code: 0.3)", min=0.0)
    local_ratio: float = option(0.25, "share of each image's tokens taken as local tokens (paper: 0.25)",
                                min=0.0, max=1.0)
    iqr_factor: float = option(1.5, "summary tokens: score above Q3 + iqr_factor * IQR (paper: 1.5)", min=0.0)
    local_layer: int = option(0, "vision layer whose CLS attention ranks local tokens (paper: 0, the first; "
                              "negative counts from the end)")
    summary_layer: int = option(-2, "vision layer whose CLS attention gives summary tokens (paper: -2, the "
                                "penultimate)")
    start_layer: int = option(2, "first language-model layer edited (paper: 2; a model with fewer layers is not "
                              "edited)", min=0)
    end_layer: int | None = option(None, "one past the last edited layer (None: the last layer, as the paper's 32 "
                                   "of 32)", min=0)
    heads: str = option("uniform", "'uniform' (every head, the released code) or 'visual' (per-head gains by the "
                        "head's image-attention share, the v1 variant)", choices=HEAD_MODES)
    scores: str = option("auto", "vision-token scores: 'cls' (CLS row; towers with a CLS token), 'received' (mean "
                         "attention each patch receives), 'auto' (cls when the tower has one)", choices=SCORES)
    chunk: int = option(256, "query rows per chunk of the 'received' scores on the torch path (CPU, masks, "
                        "float64; memory chunk x N per head); the GPU kernel needs no chunks", min=1)

    DENSE_EQUIVALENT: ClassVar[dict] = {"alpha": 0.0, "beta": 0.0}

    def validate(self) -> None:
        if self.end_layer is not None and self.end_layer <= self.start_layer:
            raise ValueError(f"{self.where('end_layer')} must be greater than start_layer ({self.start_layer}), got "
                             f"{self.end_layer}: no layer would be edited")


@dataclass
class PaintState(MethodState):
    """Whether this layer edits (fixed when patching), and how many token slots the sequence has after the latest
    call (a sliding-window cache keeps only the newest keys: the call's keys are the last ``kv_len`` slots)."""

    active: bool = False
    slots: int = 0


@dataclass
class PaintTokens:
    """The chosen image tokens of the current input: bool ``[B, T]`` over the prompt (``source``: the image-token
    mask they were placed with, so a new prompt rebuilds them)."""

    local: torch.Tensor
    summary: torch.Tensor
    source: torch.Tensor


@dataclass
class PaintCapture:
    """What the vision-tower hooks capture for one model (``PatchContext.extras['paint']``): per role
    (``"local"``, ``"summary"``), the per-image patch scores of the latest vision forward, and the tokens built from
    them."""

    token_map: TokenMap
    use_cls: bool
    chunk: int
    local_ratio: float
    iqr_factor: float
    backend: str = "auto"
    scores: dict = field(default_factory=lambda: {"local": [], "summary": []})
    tokens: PaintTokens | None = None
    orders: list = field(default_factory=list)  # windowed towers: per image, window order -> image order

    def reset(self, *_args, **_kwargs) -> None:  # the vision tower's forward pre-hook: new images
        self.scores = {"local": [], "summary": []}
        self.tokens = None
        self.orders = []


@dataclass
class WindowOrder:
    """Forward pre-hook of a windowed vision tower (Qwen2.5-VL): per image, the permutation that puts its merged
    tokens back in image order (the tower attends in window order; its merger un-permutes the same way)."""

    capture: PaintCapture

    def __call__(self, tower, args, kwargs) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            return
        window_index = _window_index(tower, grid)
        sizes = (grid.prod(-1) // tower.spatial_merge_size ** 2).tolist()
        offset, orders = 0, []
        for size in sizes:
            orders.append(torch.argsort(window_index[offset:offset + size] - offset))
            offset += size
        self.capture.orders = orders


def _window_index(tower, grid):
    """The tower's window order of the merged tokens (transformers' own function: the tower's method in older
    versions, a module function in newer ones)."""
    if hasattr(tower, "get_window_index"):
        return tower.get_window_index(grid)[0]
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import get_vision_window_index

    config = tower.config
    return get_vision_window_index(grid, spatial_merge_size=config.spatial_merge_size, window_size=config.window_size,
                                   patch_size=config.patch_size)[0]


def edited_layers(config: PaintConfig, num_layers: int) -> range:
    end = num_layers if config.end_layer is None else min(config.end_layer, num_layers)
    return range(config.start_layer, end)


def make_paint_state(module, config: PaintConfig, layer_index, role, context) -> PatchState:
    if role != "text":  # vision layers (targets="all") are only read, by install's capture
        return PatchState(config, layer_index, role, context, PaintState())
    head_counts(module)
    active = layer_index in edited_layers(config, module.config.num_hidden_layers)
    return PatchState(config, layer_index, role, context, PaintState(active=active))


# ---- the vision-tower capture --------------------------------------------------------------------------------
def patch_scores(query, key, attention_mask, *, scaling: float, use_cls: bool, chunk: int,
                 backend: str = "auto") -> torch.Tensor:
    """``[b, N]`` per image: CLS-to-patch attention (``use_cls``) or the mean attention each patch receives, summed
    over heads (query/key ``[b, H, N, d]``).  The received scores are the attention matrix's column means
    (``kernels.received``: two passes of Triton on a GPU, no ``N x N`` tensor; chunked torch, ``chunk`` query rows at
    a time, on the CPU, with a mask or in float64; ``backend`` picks, as the config's ``backend``); the CLS row is one
    row.  :func:`patch_scores_reference` is the oracle."""
    if use_cls:
        return patch_scores_reference(query, key, attention_mask, scaling=scaling, use_cls=True, chunk=chunk)
    mask = None if attention_mask is None else attention_mask[..., : key.shape[2]]
    return received_attention(query, key, scale=scaling, mask=mask, chunk_rows=chunk, backend=backend).sum(1)


def patch_scores_reference(query, key, attention_mask, *, scaling: float, use_cls: bool, chunk: int) -> torch.Tensor:
    """The oracle of :func:`patch_scores` (and its only path for the CLS row): the softmax rows materialised in
    float32 (float64 for float64 inputs), ``chunk`` query rows at a time, then summed over rows and heads."""
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    key = key.to(dtype)
    if key.shape[1] != query.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    rows = [(0, 1)] if use_cls else [(lo, min(lo + chunk, query.shape[2])) for lo in range(0, query.shape[2], chunk)]
    total = None
    for lo, hi in rows:
        logits = torch.matmul(query[:, :, lo:hi].to(dtype), key.transpose(-1, -2)) * scaling
        if attention_mask is not None:
            mask = attention_mask[..., lo:hi, : key.shape[2]]
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        part = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(2)
        total = part if total is None else total + part
    return (total / (rows[-1][1] - rows[0][0])).sum(1)


@dataclass
class _Capturing:
    """On a captured vision attention module: its shared config and the roles its scores serve."""

    original_config: object
    capture: PaintCapture
    roles: tuple[str, ...]


def capture_attention(module, query, key, value, attention_mask, **kwargs):
    """Records the module's patch scores, then runs its own attention implementation unchanged."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ..kernels.dense import eager_attention

    hook: _Capturing = module._patchattn_paint
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    with torch.no_grad():
        for q, k in _per_image(query, key, kwargs):
            score = patch_scores(q, k, attention_mask if q is query else None, scaling=scaling,
                                 use_cls=hook.capture.use_cls, chunk=hook.capture.chunk,
                                 backend=hook.capture.backend)
            for role in hook.roles:
                hook.capture.scores[role].extend(score.unbind(0))
    impl = hook.original_config._attn_implementation
    forward = ALL_ATTENTION_FUNCTIONS[impl] if impl not in (None, "eager") else eager_attention
    return forward(module, query, key, value, attention_mask, **kwargs)


def _per_image(query, key, kwargs):
    """(query, key) per image: the call itself, or its ``cu_seq_lens_q`` pieces (packed varlen calls)."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None or query.shape[0] != 1:
        return [(query, key)]
    edges = bounds.tolist()
    return [(query[:, :, a:b], key[:, :, a:b]) for a, b in itertools.pairwise(edges)]


class _Restore:
    """A removable handle: puts a captured module's shared config back."""

    def __init__(self, module):
        self.module = module

    def remove(self) -> None:
        hook = self.module.__dict__.pop("_patchattn_paint", None)
        if hook is not None:
            self.module.config = hook.original_config


class _DropExtras:
    def __init__(self, context):
        self.context = context

    def remove(self) -> None:
        self.context.extras.pop(EXTRAS_KEY, None)


def _vision_parts(model, family):
    config = getattr(model.config, family.vision_config)
    tower = next((m for m in model.modules() if getattr(m, "config", None) is config), None)
    if tower is None:
        raise TypeError(f"paint: found no vision tower in {type(model).__name__}")
    layers = [m for m in tower.modules()
              if type(m).__name__.endswith("Attention") and getattr(m, "config", None) is config]
    return tower, layers


def install_paint(model, patch) -> list:
    """Hooks on the vision tower: a pre-hook clearing the scores per image batch, and the capture on the layers
    that rank local and summary tokens.  Returns the handles ``unpatch`` removes."""
    from transformers import AttentionInterface

    family = patch.family
    if getattr(family, "kind", None) != "lvlm":  # no vision tower (the registry refuses other kinds before this)
        return []
    if family.model_type not in TOKEN_MAPS:
        raise ValueError(f"paint maps vision-tower patches to image tokens for {sorted(TOKEN_MAPS)}; "
                         f"{family.model_type!r} is not supported yet")
    config = model.get_submodule(patch.modules[0]).patchattn.config
    token_map = TOKEN_MAPS[family.model_type](model.config)
    if config.scores == "cls" and not token_map.cls:
        raise ValueError(f"paint: scores='cls' needs a vision tower with a CLS token; {family.model_type}'s has none "
                         "(use 'received' or 'auto')")
    tower, layers = _vision_parts(model, family)
    if token_map.layers is not None:  # role indices count these layers only (Qwen2.5-VL: full attention)
        layers = [layers[i] for i in token_map.layers]
    roles: dict[int, list[str]] = {}
    for role, index in (("local", config.local_layer), ("summary", config.summary_layer)):
        if not -len(layers) <= index < len(layers):
            kind = " full-attention" if token_map.layers is not None else ""
            raise ValueError(f"paint: {role}_layer={index} but the vision tower has {len(layers)}{kind} layers")
        roles.setdefault(index % len(layers), []).append(role)
    capture = PaintCapture(token_map, use_cls=token_map.cls and config.scores != "received", chunk=config.chunk,
                           local_ratio=config.local_ratio, iqr_factor=config.iqr_factor, backend=config.backend)
    AttentionInterface.register(CAPTURE_NAME, capture_attention)
    patch.context.extras[EXTRAS_KEY] = capture
    handles = [_DropExtras(patch.context), tower.register_forward_pre_hook(capture.reset)]
    if token_map.windowed:
        handles.append(tower.register_forward_pre_hook(WindowOrder(capture), with_kwargs=True))
    for index, served in roles.items():
        module = layers[index]
        private = copy.copy(module.config)
        private._attn_implementation_internal = CAPTURE_NAME
        module._patchattn_paint = _Capturing(module.config, capture, tuple(served))
        module.config = private
        handles.append(_Restore(module))
    return handles


# ---- from patch scores to image tokens ----------------------------------------------------------------------
def token_scores(patch_score: torch.Tensor, token_map: TokenMap, order: torch.Tensor | None = None) -> torch.Tensor:
    """One image's patch scores ``[N]`` -> its image tokens' scores, following the connector (``order``: a windowed
    tower's permutation from window order to image order)."""
    if token_map.cls:
        return patch_score[1:]  # LLaVA's default feature strategy drops the CLS token
    if token_map.pool is not None:
        side, out_side = math.isqrt(patch_score.numel()), math.isqrt(token_map.pool)
        grid = patch_score.view(1, 1, side, side)
        return torch.nn.functional.avg_pool2d(grid, side // out_side).flatten()
    merged = patch_score.view(-1, token_map.merge).mean(-1)
    return merged if order is None else merged[order.to(merged.device)]


def local_tokens(score: torch.Tensor, ratio: float) -> torch.Tensor:
    """bool: the top ``int(n * ratio)`` tokens of one image."""
    chosen = torch.zeros_like(score, dtype=torch.bool)
    count = int(score.numel() * ratio)
    if count:
        chosen[score.topk(count).indices] = True
    return chosen


def summary_tokens(score: torch.Tensor, factor: float) -> torch.Tensor:
    """bool: the IQR outliers ``> Q3 + factor * IQR`` of one image (quantiles interpolated linearly, as numpy)."""
    # q made on the device (linspace: exactly 0.25 and 0.75): ``torch.tensor([...], device=...)`` would copy host
    # data to the GPU, which ends with a stream synchronize.
    q1, q3 = torch.quantile(score.double(), torch.linspace(0.25, 0.75, 2, dtype=torch.float64, device=score.device))
    return score.double() > q3 + factor * (q3 - q1)


def build_tokens(capture: PaintCapture, image_mask: torch.Tensor, count: int) -> PaintTokens | None:
    """The local and summary tokens of every image, placed on the image tokens (row-major over the batch, in
    image order); None (with a warning) when the captured images do not match the ``count`` image tokens."""
    per_role = {}
    for role in ("local", "summary"):
        orders = capture.orders if capture.token_map.windowed else []
        if capture.token_map.windowed and len(orders) != len(capture.scores[role]):
            orders = []  # the count check below refuses the input
            per_role[role] = []
            continue
        per_role[role] = [token_scores(s, capture.token_map, orders[i] if orders else None)
                          for i, s in enumerate(capture.scores[role])]
    sizes = [s.numel() for s in per_role["local"]]
    if not sizes or sum(sizes) != count or len(per_role["summary"]) != len(sizes):
        warnings.warn(f"paint: the vision tower gave {sum(sizes)} token scores for {count} image "
                      "tokens; this input runs dense", stacklevel=3)
        return None
    local, summary = [], []
    for loc, summ in zip(per_role["local"], per_role["summary"]):
        s = summary_tokens(summ, capture.iqr_factor)
        local.append(local_tokens(loc, capture.local_ratio) & ~s)
        summary.append(s)
    flat_local, flat_summary = place_on_mask(image_mask, torch.stack([torch.cat(local), torch.cat(summary)]))
    return PaintTokens(flat_local, flat_summary, image_mask)


def place_on_mask(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``[n, *mask.shape]``: ``values`` ``[n, count]`` (bool) written on the True entries of ``mask`` in row-major
    order, False elsewhere; ``out[:, mask] = values`` without boolean indexing (whose output size the host reads)."""
    flat = mask.reshape(-1)
    rank = (flat.cumsum(0) - 1).clamp(0, values.shape[1] - 1)  # the entry's place among the True ones
    placed = values.to(mask.device)[:, rank] & flat
    return placed.view(values.shape[0], *mask.shape)


def current_tokens(context) -> PaintTokens | None:
    """The tokens of the current prompt, built on its first edited call and kept for the decode steps."""
    capture = context.extras.get(EXTRAS_KEY)
    image_mask = context.layout.image_token_mask
    if capture is None or image_mask is None:
        return None
    if capture.tokens is not None and capture.tokens.source is image_mask:
        return capture.tokens  # decode steps: no host read
    if not capture.scores["local"]:
        return None  # no vision forward since the last prompt (its scores are used up)
    count = int(image_mask.sum())  # the prompt's one host read (PAINT's token sets are built on the host)
    if not count:
        return None  # no image in this prompt
    capture.tokens = build_tokens(capture, image_mask, count)
    capture.scores = {"local": [], "summary": []}  # used: a later prompt needs its own vision forward
    return capture.tokens


def count_slots(kept: PaintState, q_len: int, kv_len: int) -> int:
    """The sequence's token slots after this call: a call with no cache prefix starts a sequence, others add their
    queries."""
    kept.slots = kv_len if q_len == kv_len else kept.slots + q_len
    return kept.slots


def key_boosts(tokens: PaintTokens, config: PaintConfig, batch: int, kv_len: int, slots: int, device):
    """float ``[B, Tk]``: each key's ``c`` (alpha on local, beta on summary tokens, 0 elsewhere and on the tokens
    generated since the prompt); the keys are the last ``kv_len`` of ``slots`` (a sliding-window cache); None when
    the batch or the lengths do not match."""
    width = tokens.local.shape[1]
    if tokens.local.shape[0] != batch or width > slots or kv_len > slots:
        return None
    boost = config.alpha * tokens.local.double() + config.beta * tokens.summary.double()
    boost = torch.cat([boost, boost.new_zeros(batch, slots - width)], dim=1)
    return boost[:, slots - kv_len:].to(device)


def shared_boosts(context, tokens: PaintTokens, config: PaintConfig, batch: int, kv_len: int, slots: int, device,
                  dtype) -> torch.Tensor | None:
    """``key_boosts`` as ``[B, 1, Tk]`` in the logits' dtype, built once per forward (every layer of a forward, or of
    a decode step, has the same keys): fewer ops queued per layer."""
    def build():
        boost = key_boosts(tokens, config, batch, kv_len, slots, device)
        return None if boost is None else boost.to(dtype)[:, None, :]

    key = (tokens.local, config.alpha, config.beta, batch, kv_len, slots, device, dtype)
    return per_forward(context, "paint_boosts", key, build)


def key_image(tokens: PaintTokens, kv_len: int, slots: int, device) -> torch.Tensor:
    """bool ``[B, Tk]``: the image tokens among the call's keys (placed as ``key_boosts`` places its boosts)."""
    mask = tokens.source
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], slots - mask.shape[1])], dim=1)
    return mask[:, slots - kv_len:].to(device)


def boost_logits(logits, allowed, boost, *, image=None, visual_heads: bool = False):
    """``s + c |s|`` on the allowed keys; ``boost`` ``[B, Tk]`` (or ``[B, 1, Tk]``); ``visual_heads``: ``c`` per head
    times its image share of the unedited row (``image`` bool ``[B, Tk]``) over the heads' mean share."""
    c = boost.to(logits.dtype)
    c = c[:, None, :] if c.dim() == 2 else c
    if visual_heads:
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        share = (probs * image[:, None, :].to(probs.dtype)).sum(-1, keepdim=True)  # [B, H, 1]
        mean = share.mean(1, keepdim=True)
        c = c * torch.where(mean > 0, share / mean.clamp_min(torch.finfo(share.dtype).tiny), torch.ones_like(share))
    return torch.where(allowed, logits + c * logits.abs(), logits)


@register_method(
    "paint",
    config=PaintConfig,
    category="other",
    families=("lvlm",),
    patterns=("causal-self",),
    make_state=make_paint_state,
    state_cls=PaintState,
    install=install_paint,
    paper="Arif et al., Fixing Imbalanced Attention to Mitigate In-Context Hallucination of Large Vision-Language "
    "Model / PAINT: Paying Attention to INformed Tokens to Mitigate Hallucination in LVLM, arXiv 2501.12206",
)
def paint_attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
    """Boost the logits of informed image tokens (local and summary) for the generated token."""
    state = module.patchattn
    config = state.config
    out, _ = dense_call(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    state.record(density=1.0)
    kept = state.method_state
    if not kept.active or (config.alpha == 0.0 and config.beta == 0.0):
        return out, None
    batch, kv_len = query.shape[0], key.shape[2]
    if not state.context.kind:  # a state made lazily by a call: no vision-tower capture, no image-token mask
        warnings.warn(NOT_ADOPTED, stacklevel=2)
    slots = count_slots(kept, query.shape[2], kv_len)
    tokens = current_tokens(state.context)
    boost = None if tokens is None else shared_boosts(state.context, tokens, config, batch, kv_len, slots,
                                                      query.device, compute_dtype(query))
    if boost is None:
        return out, None
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    row = last_row(query, key, value, attention_mask, scaling=scale, softcap=kwargs.get("softcap"),
                   context=state.context)
    image = key_image(tokens, kv_len, slots, query.device) if config.heads == "visual" else None

    def edit(logits, allowed):
        return boost_logits(logits, allowed, boost, image=image, visual_heads=config.heads == "visual")

    return edited_last_row(out, row, edit), None


# ---- eager oracle ----------------------------------------------------------------------------------------------
def paint_reference(q, k, v, local, summary, *, alpha, beta, scale=None, allowed=None):
    """The released code's edit on materialised scores (tests, tiny inputs): ``out [B, Hq, Tq, D]``.

    ``local`` / ``summary``: bool ``[B, Tk]`` key sets; the last query row's allowed scores become
    ``s + alpha |s|`` / ``s + beta |s|`` before the softmax; ``allowed`` bool ``[B, 1, Tq, Tk]`` (None: causal)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q_len, kv_len = q.shape[2], k.shape[2]
    if allowed is None:
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)[None, None]
    scores = q @ k.transpose(-1, -2) * scale
    last = scores[:, :, -1]
    c = (alpha * local.to(scores.dtype) + beta * summary.to(scores.dtype))[:, None, :]
    scores = torch.cat([scores[:, :, :-1], (last + c * last.abs()).unsqueeze(2)], dim=2)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0) @ v
