"""Patch the embedded SmolLM2 with a sparse method, compare with dense on real text, generate, unpatch.

    python examples/patch_llm.py [method] [tokens] [model]

``model`` is ``smollm2`` (default), ``gemma3-270m`` or a local model folder with its tokenizer.
"""

import sys

import torch

import patchattn
from patchattn.eval import mean_stat, perplexity, text_token_ids

method = sys.argv[1] if len(sys.argv) > 1 else "blocktopk"
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
model_name = sys.argv[3] if len(sys.argv) > 3 else "smollm2"

model, tokenizer = patchattn.load(model_name)
ids = text_token_ids(tokenizer, tokens)
dense = perplexity(model, ids)

handle = patchattn.patch(model, method)
print(handle.summary())
sparse = perplexity(model, ids)
density = mean_stat(model, "density")  # None: the method selects no key blocks (dense, head methods)
shown = "- (selects no key blocks)" if density is None else f"{density:.3f}"
print(f"perplexity: dense {dense:.3f}, {method} {sparse:.3f} (ratio {sparse / dense:.3f}), density {shown}")
prompt = tokenizer("The three primary colours are", return_tensors="pt")
with torch.no_grad():
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
print(tokenizer.decode(out[0], skip_special_tokens=True))
patchattn.unpatch(model)
