"""``patchattn calibrate sink-dims``: find a backbone's massive-activation ("sink") dimensions D_sink for ``var``.

Procedure (Kang et al., arXiv 2503.03321, after Sun et al.'s massive activations): run a few prompts that start
with BOS through the model (text only: D_sink is a property of the language backbone, which LVLMs inherit), take the
input of every decoder layer from ``--first-layer`` on, normalise each token by its RMS (weightless, as ``var``
does) and call an entry *massive* when it is at least ``--ratio`` times the median magnitude of its token.  Tokens
holding a massive entry are the sink tokens; the dimensions where they hold them, counted over every (prompt, layer,
token), are D_sink: the most frequent one and every dimension found at least ``--min-share`` as often, at most
``--top``.

The result is merged into a sink-dimension table (JSON; ``var``'s ``sink_dims=<path>`` reads it, the shipped one is
``calibrate/plans/sink_dims.json``): ``{"sink_dims": {model_type: [{hidden_size, num_hidden_layers,
intermediate_size, dims, models, source, meta}]}}``; an entry of the same backbone is replaced.  ``meta.peak`` is the
largest normalised value of each found dimension: ``var``'s ``tau`` (20 for 4096-wide backbones) must stay below it,
and can never exceed ``sqrt(hidden_size)``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..methods.var import MATCH_FIELDS, TABLE_KEY
from . import CALIBRATION_TEXT_OFFSET, base_parser, context_ids, model_name, save_json


def text_config_of(model):
    config = model.config
    return getattr(config, "text_config", None) or config


def load_any(name_or_path: str):
    """(model, tokenizer or None): an LLM (``calibrate.load_model``) or, for a folder whose config has a vision
    tower, the image-text model."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ..models import EMBEDDED
    from . import load_model, optional_tokenizer

    if name_or_path in EMBEDDED or not Path(name_or_path, "config.json").is_file():
        return load_model(name_or_path)
    if not hasattr(AutoConfig.from_pretrained(name_or_path), "vision_config"):
        return load_model(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype="float32").eval()
    return model, optional_tokenizer(name_or_path)


def prompts(model, tokenizer, count: int, length: int, seed: int, offset: int = CALIBRATION_TEXT_OFFSET):
    """``count`` prompts ``[1, length]``: BOS (where the model has one) then offline text, or seeded ids."""
    text = text_config_of(model)
    vocab = text.vocab_size
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    bos = bos if bos is not None else getattr(text, "bos_token_id", None)
    if bos is not None and not 0 <= bos < vocab:
        bos = None
    out = []
    for i in range(count):
        body = context_ids(tokenizer, vocab, length - (bos is not None), offset + i * length, seed)
        out.append(body if bos is None else torch.cat([torch.tensor([[bos]]), body], dim=1))
    return out


@torch.no_grad()
def find_sink_dims(model, batches, *, first_layer: int = 2, ratio: float = 100.0, min_share: float = 0.25,
                   top: int | None = None) -> dict:
    """``{"dims", "counts", "peak", "sink_tokens", "tokens", "layers"}`` from the inputs of the decoder layers."""
    text = text_config_of(model)
    layers = text.num_hidden_layers
    first = min(first_layer, layers - 1)
    counts = torch.zeros(text.hidden_size, dtype=torch.long)
    peak = torch.zeros(text.hidden_size)
    sink_tokens = tokens = 0
    device = next(model.parameters()).device
    for ids in batches:
        hidden = model(input_ids=ids.to(device), output_hidden_states=True).hidden_states
        for layer in range(first, layers):  # hidden_states[l]: the input of decoder layer l
            x = hidden[layer].float().flatten(0, 1).cpu()
            normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()
            massive = normed >= ratio * normed.median(-1, keepdim=True).values
            counts += massive.sum(0)
            peak = torch.maximum(peak, torch.where(massive, normed, 0.0).amax(0))
            sink_tokens += int(massive.any(-1).sum())
            tokens += x.shape[0]
    order = counts.argsort(descending=True, stable=True)
    best = int(counts[order[0]])
    dims = [int(d) for d in order if best > 0 and counts[d] > 0 and counts[d] >= min_share * best]
    dims = sorted(dims[:top] if top else dims)
    return {"dims": dims, "counts": {str(d): int(counts[d]) for d in dims},
            "peak": {str(d): round(float(peak[d]), 3) for d in dims}, "sink_tokens": sink_tokens, "tokens": tokens,
            "layers": [first, layers - 1]}


def merge_entry(path: Path, model_type: str, entry: dict) -> dict:
    """The table at ``path`` (or a new one) with ``entry`` replacing the entry of the same backbone."""
    table = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if not isinstance(table.get(TABLE_KEY, {}), dict):
        raise TypeError(f"{path}: {TABLE_KEY!r} must be an object {{model_type: [entries]}}")
    entries = table.setdefault(TABLE_KEY, {}).setdefault(model_type, [])
    same = [e for e in entries if all(e.get(f) == entry[f] for f in MATCH_FIELDS)]
    for e in same:
        entries.remove(e)
    entries.append(entry)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("patchattn calibrate sink-dims", __doc__.splitlines()[0], "sink_dims.json")
    parser.add_argument("--prompts", type=int, default=4, help="number of prompts (default 4)")
    parser.add_argument("--length", type=int, default=128, help="tokens per prompt, BOS included (default 128)")
    parser.add_argument("--first-layer", type=int, default=2, help="first decoder layer whose input is read "
                        "(default 2, as var's first_layer)")
    parser.add_argument("--ratio", type=float, default=100.0,
                        help="massive: at least this many times its token's median magnitude (default 100)")
    parser.add_argument("--min-share", type=float, default=0.25,
                        help="keep dimensions found at least this share as often as the most frequent (default 0.25)")
    parser.add_argument("--top", type=int, default=None, help="keep at most this many dimensions (default all)")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.length < 2 or args.ratio <= 1 or not 0 < args.min_share <= 1:
        parser.error("--prompts >= 1, --length >= 2, --ratio > 1 and 0 < --min-share <= 1 are required")
    model, tokenizer = load_any(args.model)
    model.to(args.device)
    found = find_sink_dims(model, prompts(model, tokenizer, args.prompts, args.length, args.seed, args.text_offset),
                           first_layer=args.first_layer, ratio=args.ratio, min_share=args.min_share, top=args.top)
    if not found["dims"]:
        print(f"no massive activations (>= {args.ratio}x the token median) in {found['tokens']} tokens of layers "
              f"{found['layers']}; nothing written (try a lower --ratio)", file=sys.stderr)
        return 1
    text = text_config_of(model)
    entry = {**{f: getattr(text, f, None) for f in MATCH_FIELDS}, "dims": found["dims"],
             "models": [model_name(args.model)], "source": "patchattn calibrate sink-dims",
             "meta": {k: v for k, v in {**found, **vars(args)}.items() if k not in ("dims", "model", "out", "device")}}
    out = save_json(merge_entry(Path(args.out), text.model_type, entry), args.out)
    print(f"sink dimensions of {model_name(args.model)} ({text.model_type}): {found['dims']} "
          f"(peak |x/rms|: {found['peak']}) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
