"""Speed of the DiT methods at real DiT shapes (random weights), side by side in one run with SDPA and with
FlexAttention given the *same* mask.

Two measurements per method and shape, as users time them:

- **attention**: one patched attention call (``spec.forward`` on random q/k/v with the shape's layout: token
  permutation, plan lookup and kernel included) against ``F.scaled_dot_product_attention`` on the same tensors, and
  FlexAttention on the method's own tile lists (the method's ``TiledMask``, tokens already in its order: the kernel
  alone, permutation excluded) when the method plans one;
- **forward**: one whole transformer forward (FLUX, Wan, HunyuanVideo: diffusers' own classes from a config with
  random weights, ``--layers`` blocks) patched with the method, against the same model unpatched (SDPA).

    python -m patchattn.bench.dit --csv bench/dit/h200.csv                      # CUDA GPU
    python -m patchattn.bench.dit --shapes tiny --methods dense --device cpu    # smoke test

No DiT weights are used: speed does not depend on them.  Quality is not measured here (see bench/dit/RESULTS.md).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from ..api import parse_methods, patched
from ..registry import get_spec
from ..report import environment, format_table
from ..state import PatchContext, PatchState, TokenLayout

FIELDS = ["shape", "mode", "method", "tokens", "density", "listed_tiles", "partial_tiles", "ms", "sdpa_ms",
          "speedup_vs_sdpa", "flex_ms", "vs_flex", "cosine", "psnr_db", "note"]


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: the latent grid in tokens, the text, the heads, and the model for whole forwards."""

    name: str
    family: str  # "flux" (joint, text first), "wan" (video self-attention), "hunyuan_video" (joint, text last)
    grid: tuple[int, int, int]
    n_text: int
    heads: int
    head_dim: int = 128

    @property
    def n_image(self) -> int:
        return math.prod(self.grid)

    @property
    def joint(self) -> bool:
        return self.family in ("flux", "hunyuan_video")

    def layout(self) -> TokenLayout:
        if not self.joint:
            return TokenLayout(grid=self.grid, image_slice=(0, self.n_image))
        if self.family == "flux":
            return TokenLayout(text_slices=((0, self.n_text),), grid=self.grid,
                               image_slice=(self.n_text, self.n_text + self.n_image))
        return TokenLayout(text_slices=((self.n_image, self.n_image + self.n_text),), grid=self.grid,
                           image_slice=(0, self.n_image))

    @property
    def tokens(self) -> int:
        return self.n_image + (self.n_text if self.joint else 0)


SHAPES = {
    s.name: s
    for s in [
        Shape("flux-1024", "flux", (1, 64, 64), 512, 24),
        Shape("flux-4k", "flux", (1, 128, 128), 512, 24),
        Shape("flux-4k-256", "flux", (1, 256, 256), 512, 24),  # NATTEN's GNA paper's "FLUX-4K" grid
        Shape("wan-720p", "wan", (21, 45, 80), 512, 40),
        Shape("hunyuan-720p", "hunyuan_video", (30, 48, 80), 256, 24),
        Shape("tiny-flux", "flux", (1, 12, 10), 7, 2, 32),
        Shape("tiny-wan", "wan", (3, 6, 5), 7, 2, 32),
        Shape("small-flux", "flux", (1, 32, 32), 64, 4, 64),  # CPU-sized drift runs: several tiles per axis
        Shape("small-wan", "wan", (5, 16, 16), 64, 4, 64),
        Shape("tiny-hunyuan", "hunyuan_video", (3, 6, 5), 7, 2, 32),
        Shape("small-hunyuan", "hunyuan_video", (5, 16, 16), 64, 4, 64),
    ]
}
GROUPS = {"default": ["flux-1024", "flux-4k", "wan-720p", "hunyuan-720p"],
          "tiny": ["tiny-flux", "tiny-wan", "tiny-hunyuan"], "small": ["small-flux", "small-wan", "small-hunyuan"]}


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------
def time_ms(fn, device) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, wall clock on the CPU)."""
    if device.type == "cuda":
        from .kernel import time_ms as cuda_time_ms

        return cuda_time_ms(fn)
    fn()
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs)


# ----------------------------------------------------------------------------------------------------------------
# Attention only
# ----------------------------------------------------------------------------------------------------------------
class _Module(torch.nn.Module):
    """Stands for one patched attention module: it only carries the patch state."""


def _module(shape: Shape, name: str, overrides: dict) -> _Module:
    config = get_spec(name).config_cls(**overrides)
    context = PatchContext(family=shape.family, kind="dit", layout=shape.layout())
    context.extras.update(step=None, num_steps=None, timestep=None)
    module = _Module()
    module.add_module("patchattn", PatchState(config, layer_index=0, role="dit", context=context))
    return module


def _tiled_mask(state):
    """The method's ``TiledMask`` of the latest call, if its typed state keeps one (found by type)."""
    try:
        from ..masks.tiles import TiledMask
    except ImportError:
        return None
    method_state = state.method_state
    if method_state is None:
        return None
    for f in dataclasses.fields(method_state):
        value = getattr(method_state, f.name)
        values = value.values() if isinstance(value, dict) else [value]
        for candidate in values:
            if isinstance(candidate, TiledMask):
                return candidate
            plan_mask = getattr(candidate, "tiled", None)
            if isinstance(plan_mask, TiledMask):
                return plan_mask
    return None


def flex_mask_from_tiles(tiled, heads: int):
    """A FlexAttention ``BlockMask`` with the same whole and partial tiles as ``tiled``."""
    from torch.nn.attention.flex_attention import BlockMask

    idx, cnt, ids = tiled.kv_indices.long(), tiled.kv_counts.long(), tiled.tile_mask_ids.long()
    listed = torch.arange(idx.shape[-1], device=idx.device) < cnt[..., None]
    whole, partial = listed & (ids < 0), listed & (ids >= 0)
    n_k = math.ceil(tiled.k_len / tiled.block_k)

    def packed(keep):
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
        packed_idx = torch.zeros(*idx.shape[:3], n_k, dtype=torch.int32, device=idx.device)
        packed_idx[..., :idx.shape[-1]] = torch.gather(idx, -1, order).int()
        return keep.sum(-1).int(), packed_idx

    full_cnt, full_idx = packed(whole)
    part_cnt, part_idx = packed(partial)
    # [H', NQ, NK]: -2 not listed (hidden), -1 whole tile, p >= 0 partial tile p; mask_mod is the exact token mask
    # (fused Flex evaluates it on partial blocks only, its eager path everywhere).
    table = torch.full((*idx.shape[1:3], n_k + 1), -2, dtype=torch.long, device=idx.device)  # last column: unlisted
    table.scatter_(-1, torch.where(listed[0], idx[0], n_k), torch.where(listed[0], ids[0], -2))
    table = table[..., :n_k]
    masks, bq, bk = tiled.tile_masks, tiled.block_q, tiled.block_k
    shared_heads = table.shape[0] == 1

    def mask_mod(b, h, q_idx, kv_idx):
        tile = table[0 if shared_heads else h, q_idx // bq, kv_idx // bk]
        if masks.shape[0] == 0:  # whole tiles only: indexing an empty pool fails to lower in Inductor
            return tile == -1
        return (tile == -1) | ((tile >= 0) & masks[tile.clamp(min=0), q_idx % bq, kv_idx % bk])

    return BlockMask.from_kv_blocks(part_cnt, part_idx, full_cnt, full_idx, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod,
                                    seq_lengths=(tiled.q_len, tiled.k_len))


def flex_ms(tiled, shape: Shape, device, dtype) -> float:
    """FlexAttention, compiled, on the method's tiles: q/k/v of the tiled (permuted, padded) lengths."""
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()  # a fresh compile per shape: past the recompile limit Flex would run eagerly (T x T)
    block_mask = flex_mask_from_tiles(tiled, shape.heads)
    q = torch.randn(1, shape.heads, tiled.q_len, shape.head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(1, shape.heads, tiled.k_len, shape.head_dim, device=device, dtype=dtype) for _ in "kv")
    compiled = torch.compile(flex_attention, fullgraph=True)
    # Flex's own tile (128 on Hopper) must divide the mask's blocks: run it at the method's tile size.
    options = {"BLOCK_M": tiled.block_q, "BLOCK_N": tiled.block_k}
    return time_ms(lambda: compiled(q, k, v, block_mask=block_mask, kernel_options=options), device)


def attention_row(shape: Shape, label: str, name: str, overrides: dict, device, dtype, flex: bool) -> dict:
    spec = get_spec(name)
    if spec.make_state is not None:  # its state is planned from the model's modules (moh's head plan)
        return dict(shape=shape.name, mode="attention", method=label, tokens=shape.tokens,
                    note="not timed alone: its state is planned from the model's modules; see the forward rows")
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, shape.heads, shape.tokens, shape.head_dim, device=device, dtype=dtype) for _ in "qkv")
    module = _module(shape, name, overrides).to(device)

    def run():
        return spec.forward(module, q, k, v, None, scaling=None, dropout=0.0, is_causal=False,
                            cross_attention=False, enable_gqa=False)

    ms = time_ms(run, device)
    sdpa_ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device)
    row = dict(shape=shape.name, mode="attention", method=label, tokens=shape.tokens, ms=ms, sdpa_ms=sdpa_ms,
               speedup_vs_sdpa=sdpa_ms / ms, density=module.patchattn.stats.get("density"), note="")
    tiled = _tiled_mask(module.patchattn)
    if tiled is not None:  # what the kernels read: partial tiles pay a whole tile's matmuls plus a mask load
        row["listed_tiles"], row["partial_tiles"] = tiled.tile_counts()
    if flex and tiled is not None and device.type == "cuda":
        try:
            row["flex_ms"] = flex_ms(tiled, shape, device, dtype)
        except Exception as error:  # a Flex failure is a finding for the table, not a reason to lose the run
            row["note"] = f"flex failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
            return row
        row["vs_flex"] = row["flex_ms"] / ms
        row["note"] = f"flex: same tiles ({tiled.block_q}x{tiled.block_k}), tokens already in the method's order"
    return row


# ----------------------------------------------------------------------------------------------------------------
# Whole transformer forward
# ----------------------------------------------------------------------------------------------------------------
def _rope_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX's rotary split of a head (16, 56, 56 for 128), scaled to other head sizes (each part even)."""
    first = head_dim // 8
    return first, (head_dim - first) // 2, (head_dim - first) // 2


def _flux(shape: Shape, layers: int, device, dtype):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=2 * layers,
                                   attention_head_dim=shape.head_dim, num_attention_heads=shape.heads,
                                   joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                                   axes_dims_rope=_rope_axes(shape.head_dim))
    _, h, w = shape.grid
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
    inputs = dict(hidden_states=torch.randn(1, h * w, 64), encoder_hidden_states=torch.randn(1, shape.n_text, 4096),
                  pooled_projections=torch.randn(1, 768), timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(shape.n_text, 3))
    return model, inputs, f"{layers} double + {2 * layers} single blocks (FLUX.1: 19 + 38)"


def _wan(shape: Shape, layers: int, device, dtype):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=shape.heads,
                                  attention_head_dim=shape.head_dim, in_channels=16, out_channels=16, text_dim=4096,
                                  freq_dim=256, ffn_dim=13824 if shape.heads == 40 else 4 * shape.heads * 128,
                                  num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads")
    f, h, w = shape.grid
    inputs = dict(hidden_states=torch.randn(1, 16, f, 2 * h, 2 * w), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, shape.n_text, 4096))
    return model, inputs, f"{layers} blocks (Wan 2.1 14B: 40)"


def _hunyuan(shape: Shape, layers: int, device, dtype):
    """HunyuanVideo T2V's config (hunyuanvideo-community/HunyuanVideo, diffusers' defaults) with ``layers``
    dual-stream and ``2 * layers`` single-stream blocks (the real 20 + 40 keep that ratio); inputs as its pipeline
    passes them: timestep in [0, 1000], embedded guidance 6.0 x 1000, every text token visible."""
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(in_channels=16, out_channels=16, num_attention_heads=shape.heads,
                                           attention_head_dim=shape.head_dim, num_layers=layers,
                                           num_single_layers=2 * layers, num_refiner_layers=2, mlp_ratio=4.0,
                                           patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                                           text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
                                           rope_axes_dim=_rope_axes(shape.head_dim))
    f, h, w = shape.grid
    inputs = dict(hidden_states=torch.randn(1, 16, f, 2 * h, 2 * w), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, shape.n_text, 4096),
                  encoder_attention_mask=torch.ones(1, shape.n_text, dtype=torch.long),
                  pooled_projections=torch.randn(1, 768), guidance=torch.tensor([6000.0]))
    return model, inputs, f"{layers} double + {2 * layers} single blocks (HunyuanVideo: 20 + 40)"


MODELS = {"flux": _flux, "wan": _wan, "hunyuan_video": _hunyuan}
# What each family's ``timestep`` input reads for t in [0, 1] (drift's Euler steps): FLUX t, Wan / HunyuanVideo t * 1000.
TIMESTEP_SCALE = {"flux": 1.0, "wan": 1000.0, "hunyuan_video": 1000.0}


def built_model(shape: Shape, layers: int, device, dtype):
    """(model, inputs, note) of the shape's family on ``device`` in ``dtype``, seeded."""
    torch.manual_seed(0)
    model, inputs, note = MODELS[shape.family](shape, layers, device, dtype)
    model = model.to(device=device, dtype=dtype).eval()
    inputs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    return model, inputs, note


def forward_rows(shape: Shape, methods, layers: int, device, dtype) -> list[dict]:
    if shape.family not in MODELS:
        return []
    model, inputs, note = built_model(shape, layers, device, dtype)

    def run():
        with torch.no_grad():
            return model(**inputs)

    sdpa_ms = time_ms(run, device)
    rows = []
    for label, name, overrides in methods:
        def timed():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with patched(model, name, **overrides):
                ms = time_ms(run, device)
            peak = f"; peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
            return [dict(shape=shape.name, mode="forward", method=label, tokens=shape.tokens, ms=ms, sdpa_ms=sdpa_ms,
                         speedup_vs_sdpa=sdpa_ms / ms, note=note + peak)]

        rows += _guarded(timed, shape, "forward", label, device)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Drift (not quality): how far a patched random-weight transformer's output and a few denoising steps move from dense
# ----------------------------------------------------------------------------------------------------------------
DRIFT_NOTE = "drift vs dense on random weights, not quality"


def euler_latents(model, inputs: dict, steps: int, timestep_scale: float) -> torch.Tensor:
    """``steps`` flow-matching Euler steps from the inputs' latents, the model's output taken as the velocity
    (t from 1 to 0; FLUX reads t, Wan and HunyuanVideo t * 1000): the latents after them."""
    x = inputs["hidden_states"]
    times = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for t, t_next in zip(times[:-1], times[1:]):
            step_inputs = dict(inputs, hidden_states=x,
                               timestep=torch.full_like(inputs["timestep"], float(t) * timestep_scale))
            x = x + (t_next - t) * model(**step_inputs).sample
    return x


def drift_rows(shape: Shape, methods, layers: int, device, dtype, steps: int) -> list[dict]:
    """Per method: cosine and PSNR of one transformer output, and of the latents after ``steps`` Euler steps."""
    from ..eval.drift import cosine, psnr

    if shape.family not in MODELS:
        return []
    model, inputs, note = built_model(shape, layers, device, dtype)
    scale = TIMESTEP_SCALE[shape.family]

    def outputs():
        with torch.no_grad():
            return model(**inputs).sample, euler_latents(model, inputs, steps, scale)

    reference = outputs()
    rows = []
    for label, name, overrides in methods:
        def measured():
            with patched(model, name, **overrides):
                got = outputs()
            return [dict(shape=shape.name, mode=mode, method=label, tokens=shape.tokens,
                         cosine=float(cosine(g.float(), r.float()).mean()),
                         psnr_db=float(psnr(g.float(), r.float()).mean()), note=f"{DRIFT_NOTE}; {note}")
                    for mode, g, r in (("drift-output", got[0], reference[0]),
                                       (f"drift-{steps}-steps", got[1], reference[1]))]

        rows += _guarded(measured, shape, "drift", label, device)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m patchattn.bench.dit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="gna;radial;agent;clear",
                   help="';'-separated 'name' or 'name:{json overrides}' (a label 'name@tag:{...}' keeps variants apart)")
    p.add_argument("--shapes", default="default", help=f"a group ({', '.join(GROUPS)}) or ','-separated names "
                                                      f"({', '.join(SHAPES)})")
    p.add_argument("--modes", default="attention,forward",
                   help="','-separated: attention, forward, drift (output and Euler-step latents vs dense: not quality)")
    p.add_argument("--drift-steps", type=int, default=4, help="Euler denoising steps compared in drift mode")
    p.add_argument("--layers", type=int, default=4, help="transformer blocks in a timed whole forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--csv", help="write the rows here (a .json beside it holds the environment)")
    return p.parse_args(argv)


def _shapes(text: str) -> list[Shape]:
    names = GROUPS.get(text, text.split(","))
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; known: {', '.join(SHAPES)} or groups {', '.join(GROUPS)}")
    return [SHAPES[n] for n in names]


def _failed_row(shape: Shape, mode: str, label: str, error: Exception) -> dict:
    """A row that records why a measurement failed (out of memory, an unsupported shape), so the run goes on."""
    return dict(shape=shape.name, mode=mode, method=label, tokens=shape.tokens,
                note=f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}")


def _guarded(make_rows, shape: Shape, mode: str, label: str, device) -> list[dict]:
    try:
        return make_rows()
    except (torch.OutOfMemoryError, RuntimeError, NotImplementedError, ValueError) as error:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return [_failed_row(shape, mode, label, error)]


def run_benchmark(args, emit=lambda row: None) -> list[dict]:
    """Every (shape, mode, method) row; ``emit`` gets each row as soon as it is measured (written to the CSV)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    methods = parse_methods(args.methods)
    for _, name, _ in methods:
        get_spec(name)  # unknown names fail before any timing, listing the known ones
    modes = set(args.modes.split(","))
    rows = []

    def add(new_rows):
        for row in new_rows:
            rows.append(row)
            emit(row)
            print(format_table([row], FIELDS), file=sys.stderr)

    for shape in _shapes(args.shapes):
        if "attention" in modes:
            for label, name, overrides in methods:
                add(_guarded(lambda: [attention_row(shape, label, name, overrides, device, dtype, not args.no_flex)],
                             shape, "attention", label, device))
        if "drift" in modes:
            add(_guarded(lambda: drift_rows(shape, methods, args.layers, device, dtype, args.drift_steps), shape,
                         "drift", "all", device))
        if "forward" in modes:
            add(_guarded(lambda: forward_rows(shape, methods, args.layers, device, dtype), shape, "forward", "all",
                         device))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.csv:
        rows = run_benchmark(args)
    else:  # rows are written as they come: a run cut short keeps what it measured
        meta = {"command": "python -m patchattn.bench.dit " + " ".join(argv or sys.argv[1:]), **environment()}
        with open(args.csv.rsplit(".", 1)[0] + ".json", "w") as handle:
            json.dump(meta, handle, indent=2)
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()

            def emit(row):
                writer.writerow(row)
                handle.flush()

            rows = run_benchmark(args, emit)
    print(format_table(rows, FIELDS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
