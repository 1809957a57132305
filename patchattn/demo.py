"""``patchattn demo``: every training-free method on the embedded model, against dense, on the same real text.

For each method: perplexity ratio to dense on ``--tokens`` tokens of CPython's pydoc text, the density it used
(fraction of causally allowed key blocks read), its greedy answer to a fixed question, and the wall time. A note
says when a row is not what it seems: a sparse method that reads every block at this length (it runs dense here;
the note names the config fields that make it so), or a method that changes the model a lot untrained (it is meant
to be fine-tuned; the note names its recipe when the checkout has one).

On CPU the time goes to the perplexity forward (all ``--tokens`` at once) and, for sparse methods, to the pure-torch
block-sparse path. The greedy answer is a short prompt decoded token by token: each step is a few hundred tiny
operations, which one thread runs faster than several (no thread hand-offs per operation).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import api
from .data import text_token_ids
from .eval.notes import covering_fields, dense_note, reads_everything  # noqa: F401  (covering_fields: public)
from .eval.ppl import perplexity
from .report import environment, format_table

QUESTION = "What is the capital of France?"
# A method whose perplexity is this many times dense's has changed the model, not just skipped some attention.
CHANGES_THE_MODEL = 1.5
RECIPES = Path(__file__).resolve().parent / "recipes"  # the fine-tuning recipes shipped with the package


def demo_methods(names: list[str] | None = None) -> list:
    """The methods the demo runs: ``dense`` first, then every registered training-free method for LLMs (the demo's
    model is one; DiT- and LVLM-only methods have their own examples)."""
    specs = [s for s in api.list_methods() if not s.needs_finetune and "llm" in s.families]
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


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def idle_cores() -> int:
    """Cores not busy with other work right now (cores minus the 1-minute load average), at least 1.

    On a shared machine a busy core stalls every multi-threaded operation at its barrier: measured on 2 cores
    shared with other jobs, a 2,048-token SmolLM2 forward took 22-24 s with two threads and 16-19 s with one, and
    a block-sparse layer on the torch path 0.9 s with two and 0.15-0.3 s with one.
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:  # no load average on this platform
        busy = 0.0
    return max(1, min(torch.get_num_threads(), cores - round(busy)))


def _answer(model, tokenizer, prompt: dict, max_new_tokens: int) -> str:
    # Decoding a short prompt is latency-bound: on CPU one thread beats several (measured on 2 shared cores:
    # 16 tokens of SmolLM2 in 1.2 s with one thread, 4-5 s with two).
    threads = 1 if model.device.type == "cpu" else torch.get_num_threads()
    with torch_threads(threads):
        out = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_method(model, tokenizer, spec, ids, prompt, max_new_tokens: int, density: float | None = None) -> dict:
    """One row: ``density`` (the common budget, see docs/density.md) applies to the sparse methods only."""
    start = time.perf_counter()
    overrides = {"density": density} if density is not None and spec.category == "sparse" else {}
    with api.patched(model, spec.name, **overrides) as handle:
        ppl = perplexity(model, ids)
        density = api.mean_stat(model, "density")
        answer = _answer(model, tokenizer, prompt, max_new_tokens)
        config = handle.config
    density = 1.0 if density is None and spec.category == "control" else density
    return {"method": spec.name, "category": spec.category, "ppl": ppl, "density": density, "answer": answer,
            "seconds": time.perf_counter() - start, "config": config.to_dict(),
            "_config": config}


# --------------------------------------------------------------------------------------------------------------
# Notes: why a row reads everything, or why its answer is poor
# --------------------------------------------------------------------------------------------------------------
def row_note(row: dict, tokens: int, dense_ppl: float | None) -> str | None:
    """A footnote for a row whose numbers need one, computed from its config and what it measured."""
    if "error" in row:
        return None
    if reads_everything(row["category"], row.get("density")):
        return dense_note(row["_config"], tokens)
    ratio = row["ppl"] / dense_ppl if dense_ppl else None
    if ratio is not None and ratio >= CHANGES_THE_MODEL:
        recipe = RECIPES / row["method"]
        tune = (f"fine-tune it first: patchattn train {row['method']}" if recipe.is_dir()
                else "it is meant to be fine-tuned")
        return (f"perplexity x{ratio:.1f} of dense untrained: the method changes the model itself "
                f"(category {row['category']}), so its answer is not meaningful before tuning; {tune}")
    return None


def skipped_note() -> str | None:
    llm = [s for s in api.list_methods() if "llm" in s.families]
    skipped = [s.name for s in llm if s.needs_finetune]
    other = [s.name for s in api.list_methods() if "llm" not in s.families]
    notes = []
    if skipped:
        notes.append(f"not run (need fine-tuning first, see `patchattn train --help`): {', '.join(skipped)}")
    if other:
        notes.append(f"not for language models (see examples/patch_dit.py, examples/patch_lvlm.py): {', '.join(other)}")
    return "\n".join(notes) or None


def run_demo(model_name: str = "smollm2", tokens: int = 2048, methods: list[str] | None = None,
             max_new_tokens: int = 16, json_path: str | None = None, threads: int | None = None,
             density: float | None = None) -> list[dict]:
    """Run the demo; ``threads`` is the torch thread count of the perplexity forwards (None: the idle cores);
    ``density`` sets every sparse method to the same budget instead of its paper defaults."""
    specs = demo_methods(methods)
    threads = threads or idle_cores()
    print(f"loading {model_name} ...", flush=True)
    model, tokenizer = api.load(model_name)
    ids = text_token_ids(tokenizer, tokens)
    prompt = _prompt(tokenizer)
    rows = []
    print(f"{len(specs)} methods, {tokens} tokens, {threads} torch thread(s) of {os.cpu_count()} cores", flush=True)
    with torch.no_grad(), torch_threads(threads):
        progress = tqdm(specs, desc="methods", unit="method")
        for spec in progress:
            progress.set_postfix_str(spec.name)  # which method the time is going to
            try:
                rows.append(run_method(model, tokenizer, spec, ids, prompt, max_new_tokens, density))
            except Exception as err:  # report and go on: one broken method must not hide the others
                rows.append({"method": spec.name, "category": spec.category, "error": f"{type(err).__name__}: {err}"})
    dense_ppl = next((r["ppl"] for r in rows if r["method"] == "dense" and "ppl" in r), None)
    notes: list[tuple[str, str]] = []
    for row in rows:
        if "ppl" in row and dense_ppl:
            row["ppl_ratio"] = row["ppl"] / dense_ppl
        note = row_note(row, tokens, dense_ppl)
        row.pop("_config", None)
        if note:
            notes.append((row["method"], note))
            row["note"] = note
            row["see"] = f"[{len(notes)}]"
    budget = f"; sparse methods at density {density}" if density is not None else ""
    print(f"\n{model_name}: perplexity on {tokens} tokens of pydoc text; greedy answer to {QUESTION!r}{budget}\n")
    columns = ["method", "category", "ppl", "ppl_ratio", "density", "seconds", "see", "answer"]
    print(format_table(rows, columns))
    for i, (method, note) in enumerate(notes, 1):
        print(f"[{i}] {method}: {note}")
    skipped = skipped_note() if methods is None else None
    if skipped:
        print(skipped)
    for row in rows:
        if "error" in row:
            print(f"\n{row['method']} FAILED: {row['error']}")
    if json_path:
        payload = {"model": model_name, "tokens": tokens, "threads": threads, "density": density, "question": QUESTION,
                   "environment": environment(), "results": rows}
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2)
        print(f"\nwrote {json_path}")
    return rows
