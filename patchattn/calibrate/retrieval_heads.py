"""``python -m patchattn.calibrate.retrieval_heads`` — per-head retrieval scores (copy-paste detection).

The retrieval score of Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality"
(arXiv 2404.15574, code nightdessert/Retrieval_Head): needle-in-a-haystack episodes are decoded greedily; at each
step producing token ``w``, a head gets ``1 / |needle|`` when its most-attended key (top-1 of its attention row for
the current query) lies inside the needle **and** holds the token ``w``.  An episode's score is the fraction of
the needle the head copy-pasted; episodes are kept only when the answer is right (paper: ROUGE-1 recall > 50; here
the fraction of the expected answer's tokens generated, ``--min-recall`` 0.5); a head's score is its mean over the
kept episodes.

Episodes come from a seed: a multi-token needle sentence (``The secret ingredient of the <city> <dish> is <a> <b>
from <place>.``) inserted at a depth of the passkey task's filler text (``eval.longctx``), then the question; the answer is the sentence's
continuation.  Without a tokenizer (tiny test models) the needle is a random token string, the question repeats
its first tokens (an induction cue) and the answer is the rest.  Prefill runs SDPA; only the last query row's
scores are computed to find the top-1 key (the argmax of the scores equals the argmax of the softmax).
Deviations: lengths 1–2k and a few dozen episodes (paper: up to 50k, 3 needles x 20 lengths x 10 depths).
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..data import filler_ids
from ..kernels.dense import sdpa_attention
from . import artifact, attention_probe, base_parser, context_ids, load_model, model_name, save_json

PROBE = "patchattn_calibrate_retrieval_probe"
CITIES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Accra", "Bergen", "Cusco", "Dakar"]
DISHES = ["soup", "stew", "pie", "curry", "salad", "bread", "cake", "noodles"]
WORDS = ["purple", "smoked", "frozen", "golden", "bitter", "wild", "crushed", "roasted"]
ITEMS = ["pepper", "ginger", "walnuts", "lemons", "honey", "saffron", "mint", "garlic"]
PLACES = ["a mountain farm", "the old harbour", "a quiet valley", "the night market", "a desert oasis"]
RANDOM_NEEDLE = 12
RANDOM_CUE = 4


@dataclass(frozen=True)
class Episode:
    input_ids: torch.Tensor  # [1, T] prompt
    needle: tuple[int, int]  # [start, end) of the needle in the prompt
    answer: list[int]  # expected continuation tokens


def needle_episode(tokenizer, vocab_size: int, length: int, depth: float, seed: int, offset: int) -> Episode:
    """A prompt of about ``length`` tokens with the needle at ``depth`` (0 = start, 1 = end) of the haystack."""
    rng = random.Random(f"{seed}-{length}-{depth}")
    if tokenizer is None:
        needle = [rng.randrange(3, vocab_size) for _ in range(RANDOM_NEEDLE)]
        question, answer = needle[:RANDOM_CUE], needle[RANDOM_CUE:]
    else:
        subject = f"the {rng.choice(CITIES)} {rng.choice(DISHES)}"
        secret = f" {rng.choice(WORDS)} {rng.choice(ITEMS)} from {rng.choice(PLACES)}."
        ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids
        needle = ids(f" The secret ingredient of {subject} is{secret} ")
        question = ids(f"\n\nQuestion: What is the secret ingredient of {subject}?\nAnswer: The secret "
                       f"ingredient of {subject} is")
        answer = ids(secret)
    hay = haystack(tokenizer, vocab_size, max(1, length - len(needle) - len(question)), offset, seed)
    cut = round(len(hay) * depth)
    prompt = hay[:cut] + needle + hay[cut:] + question
    return Episode(torch.tensor([prompt]), (cut, cut + len(needle)), answer)


def haystack(tokenizer, vocab_size: int, n_tokens: int, offset: int, seed: int) -> list[int]:
    """The passkey task's repeated filler (a 135M model loses needles in varied pydoc prose), or seeded ids."""
    if tokenizer is None:
        return context_ids(None, vocab_size, n_tokens, offset, seed)[0].tolist()
    return filler_ids(tokenizer, n_tokens)


def top1_probe(record: dict):
    """SDPA attention that also records, per layer, each query head's top-1 key for the last query row."""

    def attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        keys = key[0].float().repeat_interleave(groups, 0)  # [Hq, Tk, D]; batch 1
        scores = torch.einsum("hd,hkd->hk", query[0, :, -1].float(), keys)  # the last row sees every key
        window = kwargs.get("sliding_window")
        if window:  # sliding-window layers cannot see older keys
            scores[:, : max(0, key.shape[2] - window)] = float("-inf")
        record[module.layer_idx] = scores.argmax(-1)
        return sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    return attention


# transformers renamed ``past_key_values`` to ``cache`` (5.2x); accept both.
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@torch.no_grad()
def decode_with_top1(model, ids: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and, per step, ``[L, Hq]`` top-1 key positions of the query that produced the token."""
    record: dict = {}
    tokens, tops, past, step_ids = [], [], None, ids.to(model.device)
    with attention_probe(model, PROBE, top1_probe(record)):
        for _ in range(steps):
            out = model(input_ids=step_ids, **{CACHE_ARG: past}, use_cache=True)
            past = getattr(out, CACHE_ARG)
            token = int(out.logits[0, -1].argmax())
            tops.append(torch.stack([record[layer] for layer in sorted(record)]).cpu())
            tokens.append(token)
            step_ids = torch.tensor([[token]], device=model.device)
    return tokens, tops


def episode_scores(episode: Episode, tokens: list[int], tops: list[torch.Tensor]) -> torch.Tensor:
    """``[L, Hq]`` fraction of the needle each head copy-pasted (at most one credit per step)."""
    start, end = episode.needle
    context = torch.tensor(episode.input_ids[0].tolist() + tokens)
    score = torch.zeros_like(tops[0], dtype=torch.float64)
    for token, top in zip(tokens, tops):
        hit = (top >= start) & (top < end) & (context[top] == token)
        score += hit.double() / (end - start)
    return score


def recall(answer: list[int], tokens: list[int]) -> float:
    """Fraction of the expected answer's tokens that were generated (a token-level ROUGE-1 recall)."""
    return sum(t in tokens for t in answer) / max(1, len(answer))


def calibrate(model, tokenizer, lengths, depths, needles, seed, min_recall, log=print):
    total, kept, offset = 0, 0, 0
    for length in lengths:
        for depth in depths:
            for k in range(needles):
                started = time.time()
                episode = needle_episode(tokenizer, model.config.vocab_size, length, depth, seed + k, offset)
                offset += length
                tokens, tops = decode_with_top1(model, episode.input_ids, len(episode.answer) + 2)
                r = recall(episode.answer, tokens)
                if r >= min_recall:
                    total, kept = total + episode_scores(episode, tokens, tops), kept + 1
                log(f"  length {length} depth {depth:.2f} needle {k}: recall {r:.2f} "
                    f"({'kept' if r >= min_recall else 'dropped'}) {time.time() - started:.1f}s")
    if kept == 0:
        raise ValueError("no episode was answered correctly; lower --min-recall or use shorter --lengths")
    return (total / kept).tolist(), kept


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("python -m patchattn.calibrate.retrieval_heads", __doc__.splitlines()[0],
                         "retrieval_scores.json")
    parser.add_argument("--lengths", default="1000,1500,2000", help="prompt lengths (default 1000,1500,2000)")
    parser.add_argument("--depths", type=int, default=3, help="needle depths in linspace(0, 1) (default 3)")
    parser.add_argument("--needles", type=int, default=2, help="needles per length and depth (default 2)")
    parser.add_argument("--min-recall", type=float, default=0.5, help="keep episodes with answer recall >= this")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = torch.linspace(0, 1, args.depths).tolist()
    started = time.time()
    model, tokenizer = load_model(args.model)
    model.to(args.device)
    print(f"retrieval-head scores of {args.model}: lengths {lengths}, {len(depths)} depths, {args.needles} needles")
    scores, kept = calibrate(model, tokenizer, lengths, depths, args.needles, args.seed, args.min_recall)
    meta = {
        "method": "retrieval score (copy-paste top-1), arXiv 2404.15574", "lengths": lengths, "depths": depths,
        "needles": args.needles, "episodes_kept": kept, "episodes": len(lengths) * len(depths) * args.needles,
        "min_recall": args.min_recall, "haystack": "eval.longctx.FILLER" if tokenizer is not None else "seeded random ids",
        "seed": args.seed, "seconds": round(time.time() - started, 1),
        "command": "python -m patchattn.calibrate.retrieval_heads " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    path = save_json(artifact(model_name(args.model), model.config, "scores", scores, meta), args.out)
    print(f"wrote {path}: {kept} episodes kept, {meta['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
