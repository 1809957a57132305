"""``patchattn demo``: every training-free method on the embedded model, against dense, on the same real text.

For each method: perplexity ratio to dense on ``--tokens`` tokens of CPython's pydoc text, the density it used
(fraction of causally allowed key blocks read), its greedy answer to a fixed question, and the wall time.
"""

from __future__ import annotations

import json
import time

import torch
from tqdm.auto import tqdm

from . import api
from .eval.ppl import mean_stat, perplexity, text_token_ids
from .report import environment, format_table

QUESTION = "What is the capital of France?"


def demo_methods(names: list[str] | None = None) -> list:
    """The methods the demo runs: ``dense`` first, then every registered training-free method."""
    specs = [s for s in api.list_methods() if not s.needs_finetune]
    if names:
        known = {s.name: s for s in specs}
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"not training-free demo methods: {missing}; available: {', '.join(known)}")
        specs = [known[n] for n in names]
    dense = [s for s in specs if s.name == "dense"]
    return dense + [s for s in specs if s.name != "dense"]


def _prompt(tokenizer) -> dict:
    messages = [{"role": "user", "content": QUESTION}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return tokenizer(QUESTION, return_tensors="pt")


def _answer(model, tokenizer, prompt: dict, max_new_tokens: int) -> str:
    out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_method(model, tokenizer, spec, ids, prompt, max_new_tokens: int) -> dict:
    start = time.perf_counter()
    with api.patched(model, spec.name):
        ppl = perplexity(model, ids)
        density = mean_stat(model, "density")
        answer = _answer(model, tokenizer, prompt, max_new_tokens)
    density = 1.0 if density is None and spec.category == "control" else density
    return {"method": spec.name, "category": spec.category, "ppl": ppl, "density": density, "answer": answer,
            "seconds": time.perf_counter() - start}


def run_demo(model_name: str = "smollm2", tokens: int = 2048, methods: list[str] | None = None,
             max_new_tokens: int = 16, json_path: str | None = None) -> list[dict]:
    specs = demo_methods(methods)
    print(f"loading {model_name} ...", flush=True)
    model, tokenizer = api.load(model_name)
    ids = text_token_ids(tokenizer, tokens)
    prompt = _prompt(tokenizer)
    rows = []
    with torch.no_grad():
        for spec in tqdm(specs, desc="methods", unit="method"):
            try:
                rows.append(run_method(model, tokenizer, spec, ids, prompt, max_new_tokens))
            except Exception as err:  # report and go on: one broken method must not hide the others
                rows.append({"method": spec.name, "category": spec.category, "error": f"{type(err).__name__}: {err}"})
    dense_ppl = next((r["ppl"] for r in rows if r["method"] == "dense" and "ppl" in r), None)
    for row in rows:
        if "ppl" in row and dense_ppl:
            row["ppl_ratio"] = row["ppl"] / dense_ppl
    print(f"\n{model_name}: perplexity on {tokens} tokens of pydoc text; greedy answer to {QUESTION!r}\n")
    columns = ["method", "category", "ppl", "ppl_ratio", "density", "seconds", "answer"]
    print(format_table(rows, columns))
    for row in rows:
        if "error" in row:
            print(f"\n{row['method']} FAILED: {row['error']}")
    if json_path:
        payload = {"model": model_name, "tokens": tokens, "question": QUESTION, "environment": environment(),
                   "results": rows}
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
        print(f"\nwrote {json_path}")
    return rows
