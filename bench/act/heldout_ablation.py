"""ACT held-out ablation on SmolLM2: no calibration vs every candidate head vs the shipped list.

Run:  nice python bench/act/heldout_ablation.py > bench/act/heldout_ablation.json
"""

import json
from pathlib import Path

import patchattn
from patchattn.calibrate import act, load_model

model, tokenizer = load_model("smollm2")
task = act.build_task(tokenizer, 0, 64 + 256, 20)  # the calibration run's questions; held-out = the last 256
cache = act.LayerCache(model, act.split(task, 64, 320), 64) if patchattn.patch(model, "act", heads={}) else None
shipped = json.loads(Path("bench/act/smollm2_act.json").read_text())["act_heads"]
settings = {
    "dense": {},
    "all heads of layers 2..28 (beta 0.4)": {layer: list(range(9)) for layer in range(2, 29)},
    "shipped 4 heads": {layer: [h for h, on in enumerate(row) if on] for layer, row in enumerate(shipped)},
}
accuracy = {}
for name, heads in settings.items():
    act.set_heads(model, heads)
    accuracy[name] = cache.accuracy()
print(json.dumps({"split": "held-out, 256 questions (seed 0, after the 64 calibration questions)",
                  "accuracy": accuracy}, indent=1))
