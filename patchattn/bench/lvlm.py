"""Prefill time of the LVLM methods at real vision-language shapes (random weights), side by side in one run with
the unpatched model (SDPA): what a user times before the first answer token.

Shapes: LLaVA-1.5-7B (CLIP-L/336: 576 image tokens) and Qwen2.5-VL-7B with 1,296 and 4,096 image tokens (dynamic
resolution), each with a short text prompt around the image.  One whole forward of the model (vision tower, projector,
language model; ``logits_to_keep=1``), per method against the same model unpatched, same inputs.

    python -m patchattn.bench.lvlm --csv bench/lvlm/h200.csv                       # CUDA GPU
    python -m patchattn.bench.lvlm --shapes tiny --methods dense --device cpu      # smoke test

The ``dense`` row is the model patched with patchattn's dense method: what the adapter itself costs (its NaN/Inf
input check queues a flag per attention call at prefill and reads them once per forward, a host-device
synchronisation); ``--no-checks`` turns that check off for the whole run (``PATCHATTN_CHECKS=0``), leaving the
methods' own cost.
Speed does not depend on the weights; quality does and is not measured here.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

from ..api import parse_methods, patch, unpatch
from ..registry import get_spec
from ..report import format_table, write_stamped_csv
from .dit import time_ms

FIELDS = ["shape", "method", "image_tokens", "tokens", "ms", "sdpa_ms", "overhead_pct", "speedup_vs_sdpa", "note"]
TEXT_BEFORE, TEXT_AFTER = 32, 96  # prompt tokens around the image


@dataclass(frozen=True)
class Shape:
    name: str
    family: str
    image_tokens: int
    layers: int | None = None  # language-model layers (None: the real count)
    vision_layers: int | None = None  # vision-tower layers (None: the real count; fewer: the row times the LM)


SHAPES = {s.name: s for s in [
    Shape("llava-576", "llava", 576),
    Shape("qwen25vl-1296", "qwen2_5_vl", 1296),
    Shape("qwen25vl-4096", "qwen2_5_vl", 4096),
    # The language model's share: the vision tower cut to 2 layers (random weights: its cost, not its output, is
    # what goes), so the rows show what a method changes in the language model (composite's skipped blocks).
    Shape("qwen25vl-4096-lm", "qwen2_5_vl", 4096, vision_layers=2),
    Shape("qwen25vl-16384-lm", "qwen2_5_vl", 16384, vision_layers=2),
    Shape("tiny-llava", "tiny-llava", 16),
    Shape("tiny-qwen2-vl", "tiny-qwen2_vl", 4),
]}
GROUPS = {"default": ["llava-576", "qwen25vl-1296", "qwen25vl-4096"], "language": ["qwen25vl-4096-lm", "qwen25vl-16384-lm"],
          "tiny": ["tiny-llava", "tiny-qwen2-vl"]}


# ----------------------------------------------------------------------------------------------------------------
# Models at real shapes (configs only)
# ----------------------------------------------------------------------------------------------------------------
def _llava_config(layers: int | None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers or 32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


def _qwen25vl_config(layers: int | None, vision_layers: int | None = None):
    from transformers import Qwen2_5_VLConfig

    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers or 28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
    depth = vision_layers or 32
    vision = dict(depth=depth, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < depth] or [depth - 1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653)


def _ids(n_image: int, image_token: int, before: list[int] = (), after: list[int] = ()) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(100, 30000, (TEXT_BEFORE + TEXT_AFTER,), generator=gen)
    parts = [text[:TEXT_BEFORE], torch.tensor(list(before), dtype=torch.long), torch.full((n_image,), image_token),
             torch.tensor(list(after), dtype=torch.long), text[TEXT_BEFORE:]]
    return torch.cat(parts)[None]


def build(shape: Shape, layers: int | None):
    """(model, inputs) of one shape, random weights, fp32 on the CPU (moved by the caller)."""
    from transformers import AutoModelForImageTextToText

    if shape.family.startswith("tiny-"):
        from ..models import tiny_model
        from ..testing import tiny_inputs

        family = shape.family.removeprefix("tiny-")
        model = tiny_model(family)
        return model, tiny_inputs(model, family, batch=1)
    torch.manual_seed(0)
    if shape.family == "llava":
        config = _llava_config(layers)
        model = AutoModelForImageTextToText.from_config(config)
        inputs = {"input_ids": _ids(shape.image_tokens, config.image_token_id),
                  "pixel_values": torch.randn(1, 3, 336, 336)}
        return model, inputs
    config = _qwen25vl_config(layers, shape.vision_layers)
    model = AutoModelForImageTextToText.from_config(config)
    side = int(round(shape.image_tokens ** 0.5)) * 2  # patches per side before the 2x2 merge
    ids = _ids(shape.image_tokens, config.image_token_id, [config.vision_start_token_id], [config.vision_end_token_id])
    v = config.vision_config
    patch_dim = 3 * v.temporal_patch_size * v.patch_size ** 2
    inputs = {"input_ids": ids, "mm_token_type_ids": (ids == config.image_token_id).long(),
              "pixel_values": torch.randn(side * side, patch_dim), "image_grid_thw": torch.tensor([[1, side, side]])}
    return model, inputs


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------
def shape_rows(shape: Shape, methods, layers: int | None, device, dtype) -> list[dict]:
    model, inputs = build(shape, layers)
    model = model.to(device=device, dtype=dtype).eval()
    inputs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    tokens = inputs["input_ids"].shape[1]
    n_image = int((inputs["input_ids"] == model.config.image_token_id).sum())

    def prefill():
        with torch.no_grad():
            return model(**inputs, logits_to_keep=1)

    sdpa_ms = time_ms(prefill, device)
    note = f"{model.config.get_text_config().num_hidden_layers} language layers"
    if shape.vision_layers:
        note += f", vision tower cut to {shape.vision_layers} layers"
    rows = []
    for label, name, overrides in methods:
        overrides, extra = timed_overrides(model, name, overrides)
        row = dict(shape=shape.name, method=label, image_tokens=n_image, tokens=tokens, sdpa_ms=sdpa_ms,
                   note=note + extra)
        try:
            ms = _patched_ms(model, name, overrides, prefill, device)
            row.update(ms=ms, overhead_pct=100 * (ms / sdpa_ms - 1), speedup_vs_sdpa=sdpa_ms / ms)
        except Exception as error:  # one method failing on one shape is a row, not a lost run
            row["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
        rows.append(row)
        print(format_table([rows[-1]], FIELDS), file=sys.stderr)
    return rows


def timed_overrides(model, name: str, overrides: dict) -> tuple[dict, str]:
    """The overrides a row is timed with, and what its note adds.  ``var`` on a backbone with no shipped sink
    dimensions would patch nothing (no sinks to find: every layer inactive, a no-op timed as free), so it gets one
    dimension to watch: its passes then run as they would on a calibrated model (random weights have no massive
    activations, so no row is edited either way; the cost is the same)."""
    if name != "var" or "sink_dims" in overrides:
        return overrides, ""
    from ..methods.var import lookup_sink_dims, sink_dims_table

    if lookup_sink_dims(sink_dims_table(), model.config.get_text_config()) is not None:
        return overrides, ""
    return {**overrides, "sink_dims": [0]}, "; sink_dims=[0] (none shipped for this backbone)"


def _patched_ms(model, name, overrides, prefill, device) -> float:
    patch(model, name, **overrides)
    try:
        return time_ms(prefill, device)
    finally:
        unpatch(model)


def write_csv(path: str, rows: list[dict], argv) -> None:
    write_stamped_csv(path, rows, FIELDS, "python -m patchattn.bench.lvlm " + " ".join(argv or sys.argv[1:]))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m patchattn.bench.lvlm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="dense;var;vhr;paint;composite",
                   help="';'-separated 'name' or 'name:{json overrides}' (a label 'name@tag:{...}' keeps variants apart)")
    p.add_argument("--shapes", default="default", help=f"a group ({', '.join(GROUPS)}) or ','-separated names "
                                                      f"({', '.join(SHAPES)})")
    p.add_argument("--layers", type=int, default=None, help="language-model layers (default: the real count)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-checks", action="store_true",
                   help="skip patchattn's NaN/Inf input check (one host read per attention call at prefill)")
    p.add_argument("--csv", help="write the rows here (a .json beside it holds the environment)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    methods = parse_methods(args.methods)
    for _, name, _ in methods:
        get_spec(name)  # unknown names fail before any model is built, listing the known ones
    names = GROUPS.get(args.shapes, args.shapes.split(","))
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; known: {', '.join(SHAPES)} or groups {', '.join(GROUPS)}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.no_checks:
        os.environ["PATCHATTN_CHECKS"] = "0"  # read by patchattn.checks at every call
    rows = []
    for n in names:  # rows are written after every shape, so a run cut short keeps what it measured
        rows.extend(shape_rows(SHAPES[n], methods, args.layers, device, dtype))
        if args.csv:
            write_csv(args.csv, rows, argv)
    print(format_table(rows, FIELDS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
