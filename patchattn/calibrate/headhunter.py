"""``patchattn calibrate headhunter`` — HeadHunter's greedy search for the attention heads to perturb (``softpag``).

Ahn et al., Fine-Grained Perturbation Guidance via Attention Head Selection (arXiv 2506.10978), Algorithm 1: every
round, each remaining candidate head is perturbed together with the heads chosen so far, the weak model's
predictions on a set of inputs are scored by an objective, and the ``top_k`` best candidates join the chosen set.

The objective is pluggable: ``objective(perturbed, reference, inputs) -> float`` (higher is better), with
``perturbed`` the weak model's noise prediction, ``reference`` the unperturbed one and ``inputs`` the transformer's
keyword arguments; its mean over the inputs scores a head set.  The paper scores *generated images* (PickScore for
quality, style scores for a look), which needs whole generations per candidate; pass such a function with
``--objective module:function`` (or ``search_heads(objective=...)``).  The default, ``guidance_strength``, needs
no reward model: the squared change of the prediction relative to its size, ``‖ε_c − ε_p‖² / ‖ε_c‖²`` -- how far
the weak model moves the prediction, i.e. the magnitude of the guidance direction (a proxy, documented as such).

Inputs are the transformer's keyword arguments recorded from a real pipeline (a safetensors file: ``<name>`` for
one sample, ``<i>.<name>`` for several; ``--kwargs`` adds JSON arguments such as PixArt's ``added_cond_kwargs``).
The result is a JSON head list (``softpag_heads``: ``[attention modules][heads]`` of 0/1; the chosen order and each
round's scores in ``meta``) that ``softpag`` loads with ``head_file=``.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import api
from ..dit.guidance import perturbation, sample_of, set_perturbed_heads, softpag_states
from . import save_json

PAYLOAD = "softpag_heads"


def guidance_strength(perturbed: torch.Tensor, reference: torch.Tensor, inputs: dict) -> float:
    """The default objective: ``‖reference − perturbed‖² / ‖reference‖²`` (how far the weak model moves the
    prediction: the size of the guidance direction)."""
    reference, perturbed = reference.float(), perturbed.float()
    return float((reference - perturbed).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-12))


@dataclass
class HeadSearch:
    """The search's result: heads in the order chosen, and per round each candidate's score."""

    chosen: list[tuple[int, int]]
    heads_per_layer: list[int]
    rounds: list[dict] = field(default_factory=list)

    def rows(self) -> list[list[int]]:
        """``[layers][max heads]`` of 0/1 (the artifact's payload)."""
        width = max(self.heads_per_layer)
        return [[int((layer, head) in self.chosen) for head in range(width)] for layer in range(len(self.heads_per_layer))]


def _heads_per_layer(transformer) -> list[int]:
    """Query heads of each softpag-patched attention module, in adapter order."""
    counts = {}
    states = {id(s) for s in softpag_states(transformer)}
    for module in transformer.modules():
        state = getattr(module, "patchattn", None)
        if id(state) in states:
            heads = getattr(module, "heads", None)
            if not isinstance(heads, int):
                raise ValueError(f"{type(module).__name__} does not say its number of heads (.heads)")
            counts[state.layer_index] = heads
    return [counts[i] for i in sorted(counts)]


@torch.no_grad()
def search_heads(transformer, samples: list[dict], objective: Callable = guidance_strength, *, rounds: int = 2,
                 top_k: int = 1, candidates=None, log: Callable[[str], None] | None = None) -> HeadSearch:
    """Greedy HeadHunter search on a ``softpag``-patched transformer (its ``scale`` is the perturbation used).

    ``samples``: the transformer's keyword arguments, one dict per input; ``candidates``: ``(layer, head)`` pairs
    to consider (default every head of every patched module); ``rounds`` x ``top_k`` heads are chosen at most.
    """
    if rounds < 1 or top_k < 1:
        raise ValueError(f"rounds and top_k must be >= 1, got rounds={rounds}, top_k={top_k}")
    if not samples:
        raise ValueError("search_heads needs at least one input sample")
    per_layer = _heads_per_layer(transformer)
    pool = [(l, h) for l, n in enumerate(per_layer) for h in range(n)] if candidates is None else \
        [tuple(c) for c in candidates]
    with perturbation(transformer, on=False):
        references = [sample_of(transformer(**inputs)) for inputs in samples]
    chosen: list[tuple[int, int]] = []
    result = HeadSearch(chosen, per_layer)
    began = time.time()
    try:
        for round_index in range(rounds):
            remaining = [c for c in pool if c not in chosen]
            if not remaining:
                break
            scores = {}
            for candidate in remaining:
                set_perturbed_heads(transformer, [*chosen, candidate])
                with perturbation(transformer):
                    values = [objective(sample_of(transformer(**inputs)), ref, inputs)
                              for inputs, ref in zip(samples, references)]
                scores[candidate] = sum(values) / len(values)
            best = sorted(remaining, key=lambda c: scores[c], reverse=True)[:top_k]
            chosen.extend(best)
            result.rounds.append({"round": round_index, "added": [list(c) for c in best],
                                  "scores": [[l, h, round(s, 8)] for (l, h), s in scores.items()]})
            if log is not None:
                log(f"round {round_index}: added {best} (score {scores[best[0]]:.6g}); {time.time() - began:.1f}s\n")
    finally:
        set_perturbed_heads(transformer, None)
    return result


# ---- the command -------------------------------------------------------------------------------------------------
def load_transformer(folder: str, subfolder: str | None):
    """A diffusers DiT saved with ``save_pretrained`` (its class from ``config.json``'s ``_class_name``)."""
    import diffusers

    path = Path(folder) / (subfolder or "") / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --model must be a local save_pretrained folder of a DiT")
    name = json.loads(path.read_text(encoding="utf-8")).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"{path}: diffusers has no model class {name!r}")
    return cls.from_pretrained(folder, subfolder=subfolder).eval()


def load_samples(path: str, extra: dict) -> list[dict]:
    """Transformer inputs from a safetensors file (``name`` or ``<i>.name`` keys) plus JSON ``extra`` arguments."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    grouped: dict[int, dict] = {}
    for key, tensor in tensors.items():
        index, _, name = key.partition(".")
        if name and index.isdigit():
            grouped.setdefault(int(index), {})[name] = tensor
        else:
            grouped.setdefault(0, {})[key] = tensor
    return [{**grouped[i], **extra} for i in sorted(grouped)]


def load_objective(spec: str) -> Callable:
    """``module:function`` -> the function (the default objective when empty)."""
    if not spec:
        return guidance_strength
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--objective {spec!r}: expected module:function")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="patchattn calibrate headhunter",
                                     description="HeadHunter's greedy search for softpag's perturbed heads")
    parser.add_argument("--model", required=True, help="local save_pretrained folder of a diffusers DiT")
    parser.add_argument("--subfolder", default=None, help="e.g. 'transformer' for a pipeline folder")
    parser.add_argument("--inputs", required=True, help="safetensors of the transformer's keyword arguments")
    parser.add_argument("--kwargs", default="{}", help="JSON of further keyword arguments (non-tensor ones)")
    parser.add_argument("--objective", default="", help="module:function scoring (perturbed, reference, inputs); "
                        "default: guidance_strength")
    parser.add_argument("--rounds", type=int, default=2, help="greedy rounds (default 2)")
    parser.add_argument("--top-k", type=int, default=1, help="heads added per round (default 1)")
    parser.add_argument("--scale", type=float, default=1.0, help="SoftPAG strength during the search (default 1.0)")
    parser.add_argument("--out", default="headhunter_heads.json", help="output JSON")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    transformer = load_transformer(args.model, args.subfolder).to(args.device)
    samples = [{k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
               for s in load_samples(args.inputs, json.loads(args.kwargs))]
    objective = load_objective(args.objective)
    api.patch(transformer, "softpag", scale=args.scale)
    found = search_heads(transformer, samples, objective, rounds=args.rounds, top_k=args.top_k,
                         log=lambda text: print(text, end="", file=sys.stderr, flush=True))
    rows = found.rows()
    data = {"model": Path(args.model).name, "num_layers": len(rows), "num_heads": len(rows[0]), PAYLOAD: rows,
            "meta": {"heads": [list(c) for c in found.chosen], "rounds": found.rounds, "scale": args.scale,
                     "objective": args.objective or "guidance_strength", "samples": len(samples),
                     "class": type(transformer).__name__,
                     "command": "patchattn calibrate headhunter " + " ".join(argv or sys.argv[1:])}}
    path = save_json(data, args.out)
    print(f"chose {len(found.chosen)} heads {found.chosen}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
