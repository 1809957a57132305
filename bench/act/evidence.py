"""ACT on SmolLM2-135M: the attention mass on the calibrated hidden sinks drops to beta of its value.

For every layer with calibrated heads (the shipped ``smollm2_act`` list, or ``--heads``), the layer's real q/k/v
on a 512-token pydoc passage (and on 32 cloze prompts of the calibration task) are captured; the spec's eager A'
(``act_reference``, fp64) gives the sink mass before and after per head, and the fused path (kernel + lse, fp32)
is compared with it.  Run:  nice python bench/act/evidence.py > bench/act/evidence.json
"""

import argparse
import json
import sys

import torch

import patchattn
from patchattn.calibrate import attention_probe
from patchattn.calibrate.act import build_task
from patchattn.eval.ppl import text_token_ids
from patchattn.kernels.dense import sdpa_attention
from patchattn.methods import act
from patchattn.state import PatchContext, PatchState


def capture(model, input_ids, layers):
    seen = {}

    def probe(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in layers:
            seen[module.layer_idx] = (query.detach(), key.detach(), value.detach())
        return sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    with attention_probe(model, "act_evidence_probe", probe), torch.no_grad():
        model(input_ids=input_ids)
    return seen


def measure(q, k, v, heads, beta, threshold):
    """Per head: mean sink mass per row before / after (eager fp64), sinks per sequence, fused-vs-eager error."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    ref, before, after = act.act_reference(q64, k64, v64, heads, beta=beta, threshold=threshold)
    state = PatchState(patchattn.get_config("act", heads={0: heads}, beta=beta, threshold=threshold), 0, "text",
                       PatchContext())
    index = torch.tensor(heads)
    group = q.shape[1] // k.shape[1]
    fused, _ = act.calibrated_heads(state, q[:, index].float(), k[:, index // group].float(),
                                    v[:, index // group].float(), q.shape[-1] ** -0.5, None)
    rows = []
    for slot, h in enumerate(heads):
        sinks = state.method_state.sinks[:, slot]
        on = sinks[:, None, :].double()
        mass_before = (before[:, h] * on).sum(-1).mean().item()
        mass_after = (after[:, h] * on).sum(-1).mean().item()
        rows.append({"head": h, "sinks_per_sequence": sinks.sum(-1).float().mean().item(),
                     "sink_mass_before": mass_before, "sink_mass_after": mass_after,
                     "after_over_before": mass_after / mass_before if mass_before > 0 else None,
                     "row_sum_max_error": (after[:, h].sum(-1) - 1).abs().max().item(),
                     "fused_vs_eager_max_abs": (fused[:, slot].double() - ref[:, h]).abs().max().item()})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--heads", default="smollm2_act")
    parser.add_argument("--beta", type=float, default=0.4)
    parser.add_argument("--threshold", type=float, default=0.1)
    args = parser.parse_args(argv)
    model, tokenizer = patchattn.load("smollm2")
    data = act.load_heads(args.heads)
    chosen = {layer: [h for h, on in enumerate(row) if on] for layer, row in enumerate(data["act_heads"])}
    chosen = {layer: heads for layer, heads in chosen.items() if heads}
    inputs = {"pydoc passage, 512 tokens": text_token_ids(tokenizer, 512, offset=8192),
              "32 cloze prompts (20 tokens)": build_task(tokenizer, 1, 32, 20)["input_ids"]}
    result = {"heads": args.heads, "beta": args.beta, "threshold": args.threshold, "inputs": {}}
    for name, ids in inputs.items():
        seen = capture(model, ids, set(chosen))
        per_layer = {layer: measure(*seen[layer], heads, args.beta, args.threshold) for layer, heads in chosen.items()}
        flat = [r for rows in per_layer.values() for r in rows if r["after_over_before"] is not None]
        result["inputs"][name] = {
            "heads_with_sinks": len(flat), "heads": sum(map(len, chosen.values())),
            "mean_sink_mass_before": sum(r["sink_mass_before"] for r in flat) / max(1, len(flat)),
            "mean_sink_mass_after": sum(r["sink_mass_after"] for r in flat) / max(1, len(flat)),
            "after_over_before_min": min((r["after_over_before"] for r in flat), default=None),
            "after_over_before_max": max((r["after_over_before"] for r in flat), default=None),
            "fused_vs_eager_max_abs": max(r["fused_vs_eager_max_abs"] for rows in per_layer.values() for r in rows),
            "per_layer": per_layer}
        print(name, {k: v for k, v in result["inputs"][name].items() if k != "per_layer"}, file=sys.stderr)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
