"""``python -m patchattn.calibrate.moa`` — an MoA plan: per-head elastic windows ``alpha_h + beta_h * N``.

Follows MoA's profile-then-optimise recipe (Fu et al., arXiv 2406.14909, §4), at CPU scale:

1. **Profile.** On offline text (pydoc), one forward + backward per sample with an explicit-softmax attention that
   keeps each layer's attention matrix ``A`` and its gradient ``G = dL/dA``.  The loss is the cross-entropy
   against the dense model's *own* greedy next tokens (MoA's "model alignment": the paper uses answers generated
   by the dense model) on the last quarter of the sequence (the paper's loss is on response tokens only).
   The paper's influence of masking one entry and renormalising the row,
   ``E_ij = -A_ij (G_ij - sum_k A_ik G_ik) / (1 - A_ij)``, is summed into 64-token blocks per head as ``|E_ij|``
   (deviation: the signed sum let most heads of a 25%-budget plan drop to sink + diagonal, +197% perplexity).
2. **Candidates.** Per head, every rule on the grid ``alpha in linspace(-min_len, max_len, 7)`` tokens,
   ``beta in linspace(0, 1, 9)``; at each profiled length ``N`` a rule reads the sink block plus the blocks
   ``sink_and_window`` gives for a window of ``alpha + beta * N`` — the exact blocks ``moa`` will read.
   Its predicted loss is the summed influence of the blocks it does not read.
3. **Allocate.** Minimise the total predicted loss subject to the mean density over heads being at most
   ``--density`` at every profiled length.  The paper solves this MILP with Gurobi; here a Lagrangian
   relaxation (each head picks ``argmin loss + lambda * density``; bisection on ``lambda``) — it finds the
   optimum of the convex hull of each head's (density, loss) points, possibly leaving some budget unused.

Default lengths 512/1024 with 2 samples each (paper: 2k/4k/8k with many samples) keep SmolLM2 near 10 min on 2 CPU cores.
"""

from __future__ import annotations

import sys
import time

import torch

from ..masks import BlockGeometry, causal_allowed, sink_and_window
from ..methods.moa import head_windows
from . import artifact, attention_probe, base_parser, context_ids, load_model, model_name, save_json

PROBE = "patchattn_calibrate_moa_profile"


# ---- 1. profile --------------------------------------------------------------------------------------------------
def block_sum(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[..., T, T]`` -> ``[..., NQ, NK]`` sums over ``block x block`` tiles."""
    t = x.shape[-1]
    n = -(-t // block)
    x = torch.nn.functional.pad(x, (0, n * block - t, 0, n * block - t))
    return x.unflatten(-1, (n, block)).unflatten(-3, (n, block)).sum(dim=(-3, -1))


def influence(a: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """MoA's estimated loss change of masking ``A_ij`` (and renormalising its row)."""
    row = (a * grad).sum(-1, keepdim=True)
    return -a * (grad - row) / (1 - a).clamp(min=1e-6)


def profiling_attention(store: dict, block: int):
    """An explicit-softmax attention whose backward adds each head's block-pooled influence into ``store``."""

    def attention(module, query, key, value, attention_mask, *, scaling=None, dropout=0.0, softcap=None, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = (query.float() @ key.float().transpose(-1, -2)) * (scaling or query.shape[-1] ** -0.5)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        t_q, t_k = scores.shape[-2:]
        rows = torch.arange(t_q, device=scores.device)[:, None] + (t_k - t_q)
        cols = torch.arange(t_k, device=scores.device)[None]
        visible = (cols <= rows) & (rows - cols < (kwargs.get("sliding_window") or t_k + 1))
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        if probs.requires_grad:
            layer = module.layer_idx

            def accumulate(grad, probs=probs.detach()):
                # Magnitudes, not signed sums: first-order effects of masking many entries do not cancel in
                # practice, and a signed sum lets whole heads look free to drop (a 25% plan then collapses).
                pooled = block_sum(influence(probs, grad)[0].abs(), block)
                store[layer] = store.get(layer, 0) + pooled

            probs.register_hook(accumulate)
        out = probs.to(value.dtype) @ value
        return out.transpose(1, 2).contiguous(), None

    return attention


def profile(model, ids: torch.Tensor, block: int) -> torch.Tensor:
    """``[L, H, NQ, NK]`` block influence of one sample (one forward + backward, no parameter gradients)."""
    store: dict = {}
    with attention_probe(model, PROBE, profiling_attention(store, block)):
        # Gradients w.r.t. the attention maps only: the input embeddings carry requires_grad, the weights do not.
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        keep = ids.shape[1] // 4 + 1  # the "response": the last quarter of the rows predicts its next token
        logits = model(inputs_embeds=embeds, use_cache=False, logits_to_keep=keep).logits[0, :-1].float()
        labels = logits.detach().argmax(-1)  # the dense model's own greedy tokens
        torch.nn.functional.cross_entropy(logits, labels).backward()
    return torch.stack([store[layer] for layer in sorted(store)])


# ---- 2. candidates -----------------------------------------------------------------------------------------------
def candidate_grid(lengths: list[int]) -> list[tuple[float, float]]:
    alphas = torch.linspace(-min(lengths), max(lengths), 7).round().tolist()
    betas = torch.linspace(0, 1, 9).tolist()
    return [(a, b) for a in alphas for b in betas]


def candidate_costs(influence_by_len: dict, grid, block: int, sink_blocks: int):
    """(loss ``[L, H, C]`` summed over lengths, density ``[len, C]``) of every rule on the grid."""
    loss, density = 0, []
    for n, infl in influence_by_len.items():
        g = BlockGeometry(n, n, block, block)
        allowed = causal_allowed(g)
        windows = head_windows(torch.tensor(grid), n)
        masks = torch.stack([sink_and_window(g, sink_blocks * block, w) for w in windows])  # [C, NQ, NK]
        dropped = (allowed & ~masks).float()
        loss = loss + torch.einsum("lhqk,cqk->lhc", infl, dropped)
        density.append(masks.float().sum((1, 2)) / allowed.sum())
    return loss, torch.stack(density)


# ---- 3. allocate -------------------------------------------------------------------------------------------------
def allocate(loss: torch.Tensor, density: torch.Tensor, budget: float, steps: int = 60) -> torch.Tensor:
    """``[L, H]`` candidate index per head: Lagrangian relaxation of min sum(loss) s.t. mean density <= budget at
    every length; bisection on the multiplier of the summed density."""
    cost = density.sum(0)  # [C]

    def choose(lam):
        return (loss + lam * cost).argmin(-1)

    def worst_density(choice):
        return density[:, choice].mean(dim=(1, 2)).max().item()

    low, high = 0.0, 1.0
    if worst_density(choose(low)) <= budget:
        return choose(low)
    while worst_density(choose(high)) > budget and high < 1e12:
        high *= 4
    for _ in range(steps):
        mid = (low + high) / 2
        low, high = (low, mid) if worst_density(choose(mid)) <= budget else (mid, high)
    return choose(high)


# ---- command -----------------------------------------------------------------------------------------------------
def calibrate(model, tokenizer, lengths, samples, block, sink_blocks, budget, seed, log=print, text_offset=0,
              head_floor=0.0):
    """(rules ``[L][H][2]``, mean density per length, predicted loss) of a plan for ``model``."""
    model.requires_grad_(False)  # no weight gradients: only dL/dA is needed
    influence_by_len, offset = {}, text_offset
    for n in lengths:
        total = 0
        for s in range(samples):
            started = time.time()
            ids = context_ids(tokenizer, model.config.vocab_size, n, offset, seed).to(model.device)
            total = total + profile(model, ids, block).cpu()
            offset += n
            log(f"  profiled length {n} sample {s + 1}/{samples} in {time.time() - started:.1f}s")
        influence_by_len[n] = total / samples
    grid = candidate_grid(lengths)
    loss, density = candidate_costs(influence_by_len, grid, block, sink_blocks)
    # A head may not go below head_floor x budget at any profiled length: the first-order influence underrates
    # many small removals, and without a floor the allocation starves most heads (bench/quality/RESULTS.md).
    too_sparse = (density < head_floor * budget).any(0)  # [C]
    loss = loss.masked_fill(too_sparse, float("inf"))
    choice = allocate(loss, density, budget)
    rules = [[list(grid[c]) for c in row] for row in choice.tolist()]
    achieved = {n: round(density[i, choice].mean().item(), 4) for i, n in enumerate(lengths)}
    predicted = loss.gather(-1, choice[..., None]).sum().item()
    return rules, achieved, predicted


def main(argv: list[str] | None = None) -> int:
    parser = base_parser("python -m patchattn.calibrate.moa", __doc__.splitlines()[0], "moa_plan.json")
    parser.add_argument("--lengths", default="512,1024", help="profiled lengths (default 512,1024)")
    parser.add_argument("--samples", type=int, default=2, help="text samples per length (default 2)")
    parser.add_argument("--density", type=float, default=0.5, help="mean density budget at every length (0.5)")
    parser.add_argument("--block-size", type=int, default=64, help="block size of the plan's method (64)")
    parser.add_argument("--sink-blocks", type=int, default=1, help="sink blocks of the plan's method (1)")
    parser.add_argument("--head-floor", type=float, default=0.0,
                        help="no head below this fraction of the budget at any profiled length (0 = the paper's "
                        "unconstrained allocation; 0.5 is a tested remedy for starved heads)")
    args = parser.parse_args(argv)
    lengths = sorted(int(x) for x in args.lengths.split(","))
    torch.manual_seed(args.seed)
    started = time.time()
    model, tokenizer = load_model(args.model)
    model.to(args.device)
    print(f"MoA calibration of {args.model}: lengths {lengths}, {args.samples} samples each, budget {args.density}")
    rules, achieved, predicted = calibrate(model, tokenizer, lengths, args.samples, args.block_size,
                                           args.sink_blocks, args.density, args.seed, text_offset=args.text_offset,
                                           head_floor=args.head_floor)
    meta = {
        "method": "moa", "paper": "arXiv 2406.14909", "profile": "gradient influence, self-generated labels, "
        "last quarter of pydoc text" if tokenizer is not None else "gradient influence on seeded random ids",
        "allocation": "Lagrangian relaxation + bisection (paper: Gurobi MILP)", "lengths": lengths,
        "samples": args.samples, "density_budget": args.density, "density_at_length": achieved,
        "block_size": args.block_size, "sink_blocks": args.sink_blocks, "predicted_loss": predicted,
        "head_floor": args.head_floor, "seed": args.seed, "seconds": round(time.time() - started, 1),
        "command": "python -m patchattn.calibrate.moa " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    path = save_json(artifact(model_name(args.model), model.config, "rules", rules, meta), args.out)
    print(f"wrote {path}: density per length {achieved}, {meta['seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
