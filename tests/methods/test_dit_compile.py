"""torch.compile of a patched DiT transformer: every DiT method's attention traces without a graph break once its
plan exists (plans are built by an eager call: they are host-side work, kept out of the graph), and the compiled
output equals eager."""

import pytest
import torch

pytest.importorskip("diffusers")

from dit_cases import run, tiny

import patchattn

SETTINGS = {
    "dense": {},
    "gna": {"window": 2, "tile_tokens": 16, "backend": "torch"},
    "radial": {"dense_first_steps": 0, "block": 16, "backend": "torch"},
    "radial@windowed": {"dense_band": -1, "decay_factor": 0.25, "block": 16, "dense_first_steps": 0, "backend": "torch"},
    "radial@block": {"dense_band": -1, "decay_factor": 0.25, "block": 16, "dense_first_steps": 0,
                     "granularity": "block", "backend": "torch"},
    "clear": {"radius": 2, "backend": "torch"},
    "clear@small": {"radius": 1.5, "block": 16, "backend": "torch"},
    "gna@tile": {"window": 2, "tile_tokens": 16, "granularity": "tile", "backend": "torch"},
    "blocktopk": {"top_k": 1, "mass": 1.0, "block_size": 16, "backend": "torch"},
    "agent": {"pool": [1, 2, 2], "agent_until": 1.0},
    "agent@steps": {"pool": [1, 2, 2]},  # agent_until < 1, step count unknown: warns in eager calls, no break
    "softpag": {"heads": [[0, 0]], "perturb": True},
    "moh": {},
}


@pytest.mark.parametrize("method", list(SETTINGS))
def test_patched_wan_compiles_without_graph_breaks(method):
    import torch._dynamo as dynamo

    model, inputs = tiny("wan")
    inputs["hidden_states"] = torch.randn(2, 4, 2, 16, 12)  # a 2x8x6 latent grid: several tiles
    with patchattn.patched(model, method.split("@")[0], **SETTINGS[method]):
        eager = run(model, inputs)  # builds the plans
        dynamo.reset()
        explain = dynamo.explain(model)(**inputs)
        assert explain.graph_break_count == 0, [b.reason.splitlines()[0] for b in explain.break_reasons]
        with torch.no_grad():
            compiled = torch.compile(model, backend="aot_eager")(**inputs).sample
        dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
