"""``patchattn calibrate act``: choose the heads ACT calibrates, by the paper's per-head search, on local data.

Procedure (Yu et al., arXiv 2406.15765, section 4 / released code): for every candidate head of layers
2..L-2, calibrate *that head only* (beta, threshold as in the method) and measure accuracy on a labelled
calibration set; keep the heads whose solo calibration raises accuracy over the uncalibrated model.  Then the kept
heads are evaluated *together* on a held-out split, before and after, and both numbers go into the artifact.

The labelled set is built offline and deterministically (``--seed``): a 4-way next-word cloze on CPython's
``pydoc_data`` text (no network) -- after ``--context`` tokens, which of four words comes next: the real one or
three other words from the surrounding 400 tokens,
drawn at random -- answered by the choice whose first token has the highest
next-token logit (one forward per question, as the paper scores multiple choice with ``max_new_tokens = 1``).

Cost: each head's evaluation re-runs only the layers from its own layer on (the inputs of every layer are cached
from one uncalibrated pass), and only the four choice logits of the last position are computed.

The artifact is JSON: ``{"model", "num_layers", "num_heads", "act_heads": [L][H] 0/1, "meta": {..., "delta":
[L][H] accuracy change of the solo calibration (null for non-candidates), "calibration": {...}, "heldout":
{...}}}``; SmolLM2-135M's ships as ``calibrate/plans/smollm2_act.json`` and ``act``'s ``heads="auto"`` picks it.
"""

from __future__ import annotations

import sys
import time

import torch

from .. import api
from . import _text_ids, artifact, base_parser, load_model, model_name, save_json

CONTEXT_TOKENS = 24
CHOICES = 4
NEARBY = 200  # tokens either side of the answer that distractors come from


# ---- the labelled set --------------------------------------------------------------------------------------------
def word_tokens(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """bool ``[vocab]``: tokens that are a whole word of 4+ letters with a leading space (cloze answers)."""
    vocab = int(ids.max()) + 1
    words = torch.zeros(vocab, dtype=torch.bool)
    for token in ids.unique().tolist():
        text = tokenizer.decode([token])
        words[token] = text.startswith(" ") and text[1:].isalpha() and len(text) >= 5
    return words


def build_task(tokenizer, seed: int, count: int, context: int = CONTEXT_TOKENS, offset: int = 0) -> dict:
    """``count`` 4-way cloze questions from CPython's pydoc text: which word comes next after ``context`` tokens?

    Answer: the real next word; distractors: three other words of the same passage, drawn at random
    (deterministic from ``seed``).  Returns ``{"input_ids" [N, context], "attention_mask", "choices" [N, 4], "answers" [N]}``.
    """
    ids = _text_ids(tokenizer)[0]
    words = word_tokens(tokenizer, ids)
    vocabulary = words.nonzero()[:, 0]
    first = offset + context  # questions only read the text from ``offset`` on
    positions = (words[ids[first:]].nonzero()[:, 0] + first).tolist()
    if len(positions) < count:
        raise ValueError(f"the offline text has {len(positions)} cloze positions; asked for {count}")
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.tensor(positions)[torch.randperm(len(positions), generator=gen)[:count]]
    slot = torch.randint(CHOICES, (count,), generator=gen)
    table = []
    for p, at in zip(chosen.tolist(), slot.tolist()):
        answer = int(ids[p])
        # Distractors: other words from the same passage (same topic, so the context alone must decide).
        nearby = ids[max(0, p - NEARBY): p + NEARBY]
        pool = list(dict.fromkeys(t for t in nearby[words[nearby]].tolist() if t != answer))
        if len(pool) < CHOICES - 1:
            pool += [t for t in vocabulary.tolist() if t != answer and t not in pool][: CHOICES - 1]
        picks = torch.randperm(len(pool), generator=gen)[: CHOICES - 1].tolist()
        row = [pool[i] for i in picks]
        row.insert(at, answer)
        table.append(row)
    inputs = torch.stack([ids[p - context: p] for p in chosen.tolist()])
    return {"input_ids": inputs, "attention_mask": torch.ones_like(inputs), "choices": torch.tensor(table),
            "answers": slot}


def split(task: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in task.items()}


# ---- evaluation with cached layer inputs ------------------------------------------------------------------------
class LayerCache:
    """Inputs of every decoder layer from one pass, so a change in layer l re-runs only layers l..L-1."""

    def __init__(self, model, data: dict, batch_size: int):
        self.model, self.data, self.batch_size = model, data, batch_size
        self.layers = model.model.layers
        self.inputs: list[list] = []  # per batch: per layer (hidden, kwargs)
        for lo in range(0, len(data["answers"]), batch_size):
            self.inputs.append(self._capture(lo, min(len(data["answers"]), lo + batch_size)))

    def _capture(self, lo, hi):
        seen = [None] * len(self.layers)
        hooks = [layer.register_forward_pre_hook(self._hook(seen, i), with_kwargs=True)
                 for i, layer in enumerate(self.layers)]
        try:
            with torch.no_grad():
                self.model.model(input_ids=self.data["input_ids"][lo:hi],
                                 attention_mask=self.data["attention_mask"][lo:hi], use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        return seen

    @staticmethod
    def _hook(seen, index):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[index] = (hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"})
        return hook

    @torch.no_grad()
    def choice_logits(self, start_layer: int) -> torch.Tensor:
        """``[N, 4]`` logits of the choices at the last position, re-running layers ``start_layer``.. only."""
        rows = []
        for batch, seen in enumerate(self.inputs):
            lo = batch * self.batch_size
            weight = self.model.lm_head.weight[self.data["choices"][lo: lo + self.batch_size]]  # [b, 4, H]
            hidden, kwargs = seen[start_layer]
            for layer in self.layers[start_layer:]:
                hidden = layer(hidden, **kwargs)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            rows.append(torch.einsum("bh,bch->bc", self.model.model.norm(hidden[:, -1]), weight))
        return torch.cat(rows)

    def accuracy(self, start_layer: int = 0) -> float:
        predicted = self.choice_logits(start_layer).argmax(-1)
        return float((predicted == self.data["answers"]).float().mean())


def set_heads(model, chosen: dict[int, list[int]]) -> None:
    """Point every layer's ACT state at the chosen heads (the search changes them between evaluations)."""
    for index, layer in enumerate(model.model.layers):
        state = layer.self_attn.patchattn
        plan = state.method_state
        plan.heads = torch.tensor(chosen.get(index, []), dtype=torch.long, device=plan.heads.device)
        plan.sinks = None


def search(model, cache: LayerCache, layers: range, heads: int, log) -> tuple[float, list[list]]:
    """Baseline accuracy and the per-head accuracy change of calibrating each candidate head alone."""
    set_heads(model, {})
    baseline = cache.accuracy()
    delta = [[None] * heads for _ in range(model.config.num_hidden_layers)]
    total, done, began = len(layers) * heads, 0, time.time()
    for layer in layers:
        for head in range(heads):
            set_heads(model, {layer: [head]})
            delta[layer][head] = round(cache.accuracy(layer) - baseline, 6)
            done += 1
            rate = (time.time() - began) / done
            log(f"\r[{'#' * (30 * done // total):<30}] {done}/{total} heads, layer {layer} head {head}: "
                f"{delta[layer][head]:+.3f}  (eta {rate * (total - done) / 60:.1f} min)")
    set_heads(model, {})
    return baseline, delta


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("patchattn calibrate act", "ACT head search on an offline multiple-choice task",
                         "act_heads.json")
    parser.add_argument("--samples", type=int, default=96, help="calibration questions (default 96)")
    parser.add_argument("--context", type=int, default=CONTEXT_TOKENS, help="context tokens per question")
    parser.add_argument("--heldout", type=int, default=256, help="held-out questions (default 256)")
    parser.add_argument("--beta", type=float, default=0.4, help="ACT beta (default 0.4, the paper's)")
    parser.add_argument("--threshold", type=float, default=0.1, help="sink threshold (default 0.1)")
    parser.add_argument("--min-gain", type=float, default=0.0,
                        help="keep heads whose solo accuracy change is > this (default 0: any gain, as the paper)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--layers", default="", help="candidate layers 'first-last' (default 2..L-2, the paper's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise SystemExit("calibrate act needs a tokenizer (the task is text); pass a model folder with one")
    task = build_task(tokenizer, args.seed, args.samples + args.heldout, args.context, args.text_offset)
    task = {k: v.to(args.device) for k, v in task.items()}
    model.to(args.device)
    calibration, heldout = split(task, 0, args.samples), split(task, args.samples, args.samples + args.heldout)
    api.patch(model, "act", heads={}, beta=args.beta, threshold=args.threshold)
    config = model.config
    first, last = (int(x) for x in args.layers.split("-")) if args.layers else (2, config.num_hidden_layers - 2)
    if not 0 <= first <= last < config.num_hidden_layers:
        raise SystemExit(f"--layers {args.layers}: need 0 <= first <= last < {config.num_hidden_layers}")
    layers = range(first, last + 1)

    def log(text):
        print(text, end="", file=sys.stderr, flush=True)

    baseline, delta = search(model, LayerCache(model, calibration, args.batch_size), layers,
                             config.num_attention_heads, log)
    print(file=sys.stderr)
    kept = {layer: [h for h, d in enumerate(row) if d is not None and d > args.min_gain]
            for layer, row in enumerate(delta)}
    rows = [[int(h in kept[layer]) for h in range(config.num_attention_heads)] for layer in range(len(delta))]
    held = LayerCache(model, heldout, args.batch_size)
    set_heads(model, {})
    held_before = held.accuracy()
    calib_cache = LayerCache(model, calibration, args.batch_size)
    set_heads(model, {k: v for k, v in kept.items() if v})
    held_after, calib_after = held.accuracy(), calib_cache.accuracy()
    meta = {"beta": args.beta, "threshold": args.threshold, "seed": args.seed, "min_gain": args.min_gain,
            "text_offset": args.text_offset, "command": "patchattn calibrate act " + " ".join(argv or sys.argv[1:]),
            "task": f"4-way next-word cloze on CPython pydoc text, {args.context} context tokens, choice logits",
            "candidate_layers": [layers.start, layers.stop - 1], "delta": delta,
            "calibration": {"questions": args.samples, "accuracy_before": baseline, "accuracy_after": calib_after},
            "heldout": {"questions": args.heldout, "accuracy_before": held_before, "accuracy_after": held_after},
            "heads_kept": sum(map(sum, rows))}
    path = save_json(artifact(model_name(args.model), config, "act_heads", rows, meta), args.out)
    print(f"kept {meta['heads_kept']} heads; calibration accuracy {baseline:.3f} -> {calib_after:.3f}; held-out "
          f"{held_before:.3f} -> {held_after:.3f}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
