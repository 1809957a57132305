"""``patchattn bench generate``: the real ``model.generate`` path, each method beside SDPA in one run.

What a user times: time to first token, decode tokens per second, peak GPU memory and the KV cache's size, per
cache kind, on a Llama with Llama-3-8B's shape (32 layers, 32 query / 8 KV heads of 128, hidden 4096) and random
bf16 weights -- speed does not depend on the weights; quality is measured elsewhere (bench/quality).

Measurement (per method x cache kind x prompt length x batch):

- one warm-up ``generate`` of N2 tokens (Triton autotuning, ``torch.compile``, the static cache sized for N2);
- ``--repeats`` pairs of ``generate`` calls with N1 and N2 new tokens (``min_new_tokens`` forces the length), the
  device synchronised around each: decode ms/step is the median over the N2 calls of the time from their first new
  token to their last, divided by the N2 - 1 steps between (a streamer stamps each token as ``generate`` hands it to
  the host), so the prefill's run-to-run variation stays out (at 128k it can exceed a second, more than hundreds of
  compiled steps take); ``decode_ms_differential``, the median of (t2 - t1) / (N2 - N1) over the pairs, is kept as a
  cross-check; time to first token is the median of ``generate`` with one new token (with N1 = 1 the short calls of
  the pairs are those samples: no extra prefills);
- peak memory (``torch.cuda.max_memory_allocated``) over the measured calls, and the KV cache's own bytes (its
  layers' key and value tensors after the last call; a method's own between-step state is not counted).

Cache kinds: ``dynamic`` (transformers' default cache, eager), ``static`` (``cache_implementation="static"``,
eager), ``static-compiled`` (the same with transformers' automatic compile of the decode step, ``CompileConfig``
from ``--compile-mode``/``--fullgraph``), ``compiled`` (``torch.compile(model.forward)`` with the default cache;
the prefill is compiled too), ``bounded`` (``patchattn.bounded_cache(model)`` passed as the cache, eager, where this
version has it), ``bounded-static`` (``bounded_cache(model, static=True)``: fixed-size buffers, eager) and
``bounded-static-compiled`` (the same with ``generate``'s own compile of a compileable cache, ``CompileConfig`` as
for static-compiled). ``kind=m1+m2`` limits a kind to those methods (``bounded=streaming+duo``).

A configuration that fails (out of memory, a compile error, a missing feature) is recorded as a row with its
error and the run goes on; one whose full KV cache cannot fit in the GPU's memory is skipped with a row saying so.
Rows are appended to the CSV as they come, so a run cut short keeps what it measured.

    patchattn bench generate --lengths 32768,131072 --batch 1 --methods dense,hip,blocktopk,streaming \\
        --caches dynamic,static-compiled,bounded=streaming --csv generate.csv --plot generate.png
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import hashlib
import inspect
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..api import get_handle, parse_methods, patch, unpatch
from ..report import environment, format_table

CACHES = ("dynamic", "static", "static-compiled", "compiled", "bounded", "bounded-static", "bounded-static-compiled")
COMPILED = ("static-compiled", "compiled", "bounded-static-compiled")
BOUNDED = ("bounded", "bounded-static", "bounded-static-compiled")
COLUMNS = ["method", "cache", "batch", "prompt", "ttft_s", "decode_ms_per_step", "decode_ms_spread", "decode_tok_s",
           "decode_ms_differential", "ttft_vs_sdpa", "decode_vs_sdpa", "peak_gib", "kv_cache_bytes", "tokens_equal_dynamic", "tokens_hash",
           "new_tokens", "repeats", "graphs_warmup", "graphs_timed", "graph_breaks", "config_s", "error"]
PROGRESS = ["method", "cache", "batch", "prompt", "ttft_s", "decode_ms_per_step", "decode_tok_s", "peak_gib",
            "kv_cache_bytes", "tokens_equal_dynamic", "config_s", "error"]
SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, rope_theta=500000.0),
    # CPU tests: the same architecture, small enough to generate a few hundred tokens in well under a second
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class NotRun(Exception):
    """A configuration not measured, for a reason its message states (recorded as the row's error as is)."""


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------
def cache_kinds(text: str) -> list[tuple[str, frozenset | None]]:
    """'dynamic,bounded=streaming+duo' -> [('dynamic', None), ('bounded', {'streaming', 'duo'})] (None: every
    method); an unknown kind is an argparse error."""
    kinds = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, only = item.partition("=")
        if kind not in CACHES:
            raise argparse.ArgumentTypeError(f"unknown cache kind {kind!r} (choose among {', '.join(CACHES)})")
        kinds.append((kind, frozenset(only.split("+")) if only else None))
    if not kinds:
        raise argparse.ArgumentTypeError("no cache kind given")
    return kinds


def new_token_counts(text: str) -> tuple[int, int]:
    """'N1,N2' (1 <= N1 < N2); a single N means '1,N'."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N1,N2 (integers), got {text!r}") from None
    counts = [1, *counts] if len(counts) == 1 else counts
    if len(counts) != 2 or not 1 <= counts[0] < counts[1]:
        raise argparse.ArgumentTypeError(f"expected N1,N2 with 1 <= N1 < N2, got {text!r}")
    return counts[0], counts[1]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="patchattn bench generate", description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="32768,131072", help="prompt lengths in tokens")
    p.add_argument("--batch", default="1", help="batch sizes (every row the same prompt length)")
    p.add_argument("--methods", default="dense,hip,blocktopk,streaming",
                   help="methods (dense = the model's SDPA), as for `patchattn eval`: 'a,b' or 'a;b@x:{...}'")
    p.add_argument("--caches", type=cache_kinds, default="dynamic,static-compiled",
                   help=f"cache kinds among {', '.join(CACHES)}; 'kind=m1+m2' runs that kind for those methods only")
    p.add_argument("--new-tokens", type=new_token_counts, default="1,25",
                   help="N1,N2: the two generate lengths of the differential decode timing (N1 = 1: the short "
                        "calls are also the time-to-first-token samples)")
    p.add_argument("--repeats", type=int, default=3, help="timed (N1, N2) pairs per configuration (median)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (32: Llama-3-8B)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b", help="model shape (tiny: CPU tests)")
    p.add_argument("--device", default="cuda", help="where the model runs (cpu: tests and dry runs)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--compile-mode", default="reduce-overhead",
                   help="torch.compile mode of static-compiled (transformers' CompileConfig default)")
    p.add_argument("--forward-compile-mode", default="default",
                   help="torch.compile mode of the compiled kind (the default cache grows: no CUDA graphs)")
    p.add_argument("--fullgraph", action="store_true", help="compile with fullgraph=True (a graph break fails)")
    p.add_argument("--reference", action="append", default=[], metavar="CSV",
                   help="an earlier run's CSV whose dynamic rows give tokens_equal_dynamic where this run has none")
    p.add_argument("--csv", default=None, help="write the rows here (first line: the environment)")
    p.add_argument("--plot", default=None, metavar="PNG", help="draw the rows (patchattn.bench.generate_plot)")
    p.add_argument("--profile-step", default=None, metavar="PATH",
                   help="instead of the benchmark: profile one eager decode step per method after a prefill of the "
                        "first length and batch; writes PATH.json and PATH.md (patchattn.bench.generate_profile)")
    p.add_argument("--profile-steps", type=int, default=10, help="timed steps per method for --profile-step")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


@dataclass(frozen=True)
class Plan:
    """How each configuration is measured."""

    n1: int
    n2: int
    repeats: int
    compile_mode: str = "reduce-overhead"
    forward_compile_mode: str = "default"
    fullgraph: bool = False

    @property
    def label(self) -> str:
        return f"{self.n1},{self.n2}"


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------
def build_model(layers: int, max_len: int, *, shape: str = "llama3-8b", device="cuda", dtype=torch.bfloat16):
    """A Llama of the given shape with random weights, built on ``device`` (on a GPU: seconds, not minutes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=max_len)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return model.eval()


def llama3_8b_shaped(layers: int, max_len: int, device="cuda", dtype=torch.bfloat16):
    """A Llama-3-8B-shaped model with random weights (bf16 on the GPU by default)."""
    return build_model(layers, max_len, shape="llama3-8b", device=device, dtype=dtype)


def cache_argument(model) -> str:
    """The name ``forward``/``generate`` take a cache under (transformers renamed ``past_key_values`` to ``cache``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def full_kv_bytes(config, batch: int, tokens: int, dtype) -> int:
    """Bytes of a full (non-evicting) KV cache: keys and values of every layer for ``tokens`` positions."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype.itemsize
    return per_token * batch * tokens


def check_fits(kv_bytes: int, resident_bytes: int, capacity_bytes: int) -> None:
    """Raise NotRun when the KV cache alone, beside what is already resident (the weights), exceeds the device."""
    if kv_bytes + resident_bytes > capacity_bytes:
        raise NotRun(f"skipped: KV cache {kv_bytes / 2**30:.1f} GiB + resident {resident_bytes / 2**30:.1f} GiB "
                     f"exceed the device's {capacity_bytes / 2**30:.1f} GiB")


def cache_nbytes(cache) -> int | None:
    """Bytes of the tensors a transformers cache's layers hold: keys, values and whatever a bounded cache keeps
    beside them (slot groups, positions), found in the layers' attributes, their lists and dataclasses -- not in
    modules or method state they refer to; each storage counted once. None when there are none to see."""
    if cache is None:
        return None
    storages: dict[int, int] = {}
    for layer in getattr(cache, "layers", None) or []:
        # a bounded layer refers to its attention module and the patch's state: not the cache's own memory
        own = {name: value for name, value in vars(layer).items() if name not in ("module", "state")}
        _collect_storages(own, storages, depth=4)
    return sum(storages.values()) if storages else None


def _collect_storages(value, storages: dict, depth: int) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel():
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    elif depth == 0 or isinstance(value, torch.nn.Module):
        return
    elif isinstance(value, dict):
        for item in value.values():
            _collect_storages(item, storages, depth - 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect_storages(item, storages, depth - 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            _collect_storages(getattr(value, field.name), storages, depth - 1)


# --------------------------------------------------------------------------------------------------------------
# One timed generate
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Generated:
    seconds: float
    tokens: torch.Tensor  # [B, new tokens], on the CPU
    kv_bytes: int | None
    step_seconds: float | None = None  # from the first new token to the last, per step between (StepClock)


class StepClock:
    """A ``generate`` streamer that stamps the time each new token reaches the host (``generate`` copies it there
    before ``put``; the first ``put`` is the prompt).  Where transformers defers that copy by a step (its
    ``DeferredStopCheck`` on a GPU), every stamp shifts by about one step, which the first-to-last difference
    mostly cancels."""

    def __init__(self):
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, _tokens) -> None:
        if self._prompt_seen:
            self.stamps.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass

    def step_seconds(self) -> float | None:
        """Seconds per decode step between the first and the last new token, or None with fewer than two."""
        if len(self.stamps) < 2:
            return None
        return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compile_config(plan: Plan, device: torch.device):
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=plan.fullgraph, mode=plan.compile_mode)
    if device.type != "cuda":
        config._compile_all_devices = True  # transformers compiles only on accelerators unless told (CPU tests)
    return config


def _bounded_cache(model, static: bool):
    import patchattn

    factory = getattr(patchattn, "bounded_cache", None)
    if factory is None:
        raise NotRun("not available: this patchattn has no bounded_cache")
    return factory(model, static=True) if static else factory(model)


def generate_kwargs(model, kind: str, new_tokens: int, plan: Plan) -> dict:
    """``generate`` arguments for one cache kind (a bounded cache is built fresh for every call)."""
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0,
              "return_dict_in_generate": True}
    if kind in ("static", "static-compiled"):
        kwargs["cache_implementation"] = "static"
    if kind in BOUNDED:
        kwargs[cache_argument(model)] = _bounded_cache(model, static=kind != "bounded")
    if kind in ("static-compiled", "bounded-static-compiled"):
        kwargs["compile_config"] = _compile_config(plan, model.device)
    elif kind != "dynamic":  # generate would compile the step of a compileable cache on a GPU by itself
        kwargs["disable_compile"] = True
    return kwargs


def timed_generate(model, ids: torch.Tensor, kind: str, new_tokens: int, plan: Plan) -> Generated:
    """One ``generate``, timed between device synchronisations; its output is dropped before returning so that
    no cache outlives the call (the next call's peak memory is its own)."""
    kwargs = generate_kwargs(model, kind, new_tokens, plan)
    clock = StepClock()
    _sync(ids.device)
    start = time.perf_counter()
    out = model.generate(input_ids=ids, streamer=clock, **kwargs)
    _sync(ids.device)
    seconds = time.perf_counter() - start
    cache = getattr(out, "cache", None)
    cache = cache if cache is not None else getattr(out, "past_key_values", None)
    generated = Generated(seconds, out.sequences[:, ids.shape[1]:].cpu(), cache_nbytes(cache), clock.step_seconds())
    del out, cache, kwargs
    return generated


@contextlib.contextmanager
def forward_compiled(model, kind: str, plan: Plan):
    """``torch.compile(model.forward)`` for the compiled kind, undone afterwards."""
    if kind != "compiled":
        yield
        return
    model.forward = torch.compile(model.forward, mode=plan.forward_compile_mode, fullgraph=plan.fullgraph)
    try:
        yield
    finally:
        del model.forward


def measure(model, ids: torch.Tensor, kind: str, plan: Plan) -> tuple[dict, torch.Tensor]:
    """Warm-up, then the differential decode timing and time to first token; the row's figures and the tokens of
    the last N2 call."""
    device = ids.device
    before = compile_counts()
    timed_generate(model, ids, kind, plan.n2, plan)  # warm-up: autotune, compile, static cache sized for N2
    warm = compile_counts()
    _reset_peak(device)
    steps, differentials, firsts, last = [], [], [], None
    for _ in range(plan.repeats):
        short = timed_generate(model, ids, kind, plan.n1, plan)
        last = timed_generate(model, ids, kind, plan.n2, plan)
        steps.append(last.step_seconds)
        differentials.append((last.seconds - short.seconds) / (plan.n2 - plan.n1))
        if plan.n1 == 1:
            firsts.append(short.seconds)
    if plan.n1 != 1:
        firsts = [timed_generate(model, ids, kind, 1, plan).seconds for _ in range(plan.repeats)]
    step = statistics.median(steps)
    row = {"ttft_s": statistics.median(firsts), "decode_ms_per_step": 1000 * step,
           "decode_ms_spread": 1000 * (max(steps) - min(steps)),
           "decode_ms_differential": 1000 * statistics.median(differentials),
           "decode_tok_s": ids.shape[0] / step if step > 0 else None,
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
           "kv_cache_bytes": last.kv_bytes}
    if kind in COMPILED:  # graphs compiled during the timed calls mean recompiles inside the timings
        after = compile_counts()
        row.update(graphs_warmup=warm[0] - before[0], graphs_timed=after[0] - warm[0],
                   graph_breaks=after[1] - before[1])
    return row, last.tokens


def compile_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) by torch.compile so far in this process."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def release(model, kind: str) -> None:
    """Free what a configuration left: transformers' remembered static-cache length and compiled step (a later
    configuration must size and compile its own), compiled graphs, cached blocks; peak statistics restart."""
    for name in ("_compiled_call", "_last_compile_config", "_previous_max_cache_length", "_cache"):
        model.__dict__.pop(name, None)
    if kind in COMPILED:
        torch._dynamo.reset()
    gc.collect()
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(model.device)


# --------------------------------------------------------------------------------------------------------------
# Tokens compared with the default cache
# --------------------------------------------------------------------------------------------------------------
def tokens_hash(tokens: torch.Tensor) -> str:
    """One short hash per sequence (space-separated): comparable across runs and CSVs."""
    return " ".join(hashlib.sha1(row.to(torch.int64).numpy().tobytes()).hexdigest()[:10] for row in tokens)


def equal_count(hashes: str, reference: str | None) -> str | None:
    """'k/B': sequences whose tokens equal the reference's."""
    if reference is None:
        return None
    mine, theirs = hashes.split(), reference.split()
    return f"{sum(a == b for a, b in zip(mine, theirs))}/{len(mine)}"


def reference_hashes(paths: list[str]) -> dict:
    """(method, batch, prompt, new_tokens) -> tokens_hash of the dynamic rows of earlier CSVs."""
    from .generate_plot import read_rows

    return {_token_key(r): r["tokens_hash"] for r in read_rows(paths) if r.get("cache") == "dynamic"
            and r.get("tokens_hash") and not r.get("error")}


def _token_key(row: dict) -> tuple:
    return str(row["method"]), int(row["batch"]), int(row["prompt"]), str(row["new_tokens"])


# --------------------------------------------------------------------------------------------------------------
# Ratios against SDPA
# --------------------------------------------------------------------------------------------------------------
def _number(value) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def add_sdpa_ratios(rows: list[dict]) -> list[dict]:
    """ttft_vs_sdpa (SDPA's TTFT / the row's) and decode_vs_sdpa (the row's tokens/s / SDPA's) against the dense
    row of the same cache kind, batch and prompt, else the dense dynamic row; in place, returns the rows."""
    dense = {(r["cache"], int(r["batch"]), int(r["prompt"])): r for r in rows
             if r["method"] == "dense" and not r.get("error")}
    for row in rows:
        ref = dense.get((row["cache"], int(row["batch"]), int(row["prompt"]))) or \
            dense.get(("dynamic", int(row["batch"]), int(row["prompt"])))
        ttft, ref_ttft = _number(row.get("ttft_s")), _number(ref.get("ttft_s")) if ref else None
        tok, ref_tok = _number(row.get("decode_tok_s")), _number(ref.get("decode_tok_s")) if ref else None
        row["ttft_vs_sdpa"] = ref_ttft / ttft if ttft and ref_ttft else None
        row["decode_vs_sdpa"] = tok / ref_tok if tok and ref_tok else None
    return rows


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------
def describe(err: BaseException) -> str:
    if isinstance(err, NotRun):
        return str(err)
    lines = str(err).strip().splitlines() or [""]
    return f"{type(err).__name__}: {lines[0][:200]}"


def run_config(model, label: str, kind: str, batch: int, length: int, plan: Plan, references: dict) -> dict:
    """One configuration's row; an exception inside becomes the row's error, and memory is freed either way."""
    row = {"method": label, "cache": kind, "batch": batch, "prompt": length, "new_tokens": plan.label,
           "repeats": plan.repeats}
    start = time.perf_counter()
    try:
        if model.device.type == "cuda" and kind not in BOUNDED:
            check_fits(full_kv_bytes(model.config, batch, length + plan.n2, model.dtype),
                       torch.cuda.memory_allocated(model.device),
                       torch.cuda.get_device_properties(model.device).total_memory)
        gen = torch.Generator().manual_seed(length)
        ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=gen).to(model.device)
        with forward_compiled(model, kind, plan):
            measured, tokens = measure(model, ids, kind, plan)
        row.update(measured, tokens_hash=tokens_hash(tokens))
        key = _token_key(row)
        if kind == "dynamic":
            references[key] = row["tokens_hash"]
        else:
            row["tokens_equal_dynamic"] = equal_count(row["tokens_hash"], references.get(key))
    except Exception as err:  # OOM, compile errors, a missing feature: recorded, the run goes on
        row["error"] = describe(err)
    finally:
        release(model, kind)
    row["config_s"] = time.perf_counter() - start
    return row


def configurations(methods: list, kinds: list, lengths: list[int], batches: list[int]):
    """(label, method, overrides, kind, length, batch) in run order: per method, the dynamic cache first (the
    reference of tokens_equal_dynamic)."""
    kinds = sorted(kinds, key=lambda k: k[0] != "dynamic")
    for label, method, overrides in methods:
        for kind, only in kinds:
            if only is not None and label not in only and method not in only:
                continue
            for length in lengths:
                for batch in batches:
                    yield label, method, overrides, kind, length, batch


class CsvSink:
    """Rows appended to the CSV as they come (first line: the environment and the command)."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="", encoding="utf-8") as handle:
                handle.write("# " + json.dumps({**environment(), "command": " ".join(sys.argv)}) + "\n")
                csv.DictWriter(handle, fieldnames=COLUMNS).writeheader()

    def add(self, row: dict) -> None:
        if self.path:
            with open(self.path, "a", newline="", encoding="utf-8") as handle:
                csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore").writerow(row)

    def rewrite(self, rows: list[dict]) -> None:
        """Rewrite the rows (after the SDPA ratios are known), keeping the first line."""
        if self.path:
            first = Path(self.path).read_text(encoding="utf-8").splitlines()[0]
            with open(self.path, "w", newline="", encoding="utf-8") as handle:
                handle.write(first + "\n")
                writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)


def run(args, sink: CsvSink | None = None) -> list[dict]:
    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batch.split(",")]
    plan = Plan(*args.new_tokens, args.repeats, args.compile_mode, args.forward_compile_mode, args.fullgraph)
    configs = list(configurations(parse_methods(args.methods), args.caches, lengths, batches))
    per_config = 1 + 2 * plan.repeats + (plan.repeats if plan.n1 != 1 else 0)
    print(f"{len(configs)} configurations, each {per_config} generate calls (prefills) and "
          f"{plan.n2 - 1 + plan.repeats * (plan.n1 + plan.n2 - 2)} decode steps", flush=True)
    model = build_model(args.layers, max(lengths) + plan.n2, shape=args.shape, device=args.device,
                        dtype=DTYPES[args.dtype])
    release(model, "dynamic")
    references = reference_hashes(args.reference) if args.reference else {}
    rows, patched, patch_error = [], None, None
    for label, method, overrides, kind, length, batch in configs:
        if patched != label:
            patch_error = _repatch(model, method, overrides)
            patched = label
        if patch_error is None:
            rows.append(run_config(model, label, kind, batch, length, plan, references))
        else:
            rows.append({"method": label, "cache": kind, "batch": batch, "prompt": length, "new_tokens": plan.label,
                         "repeats": plan.repeats, "error": patch_error})
        print(format_table([rows[-1]], PROGRESS), flush=True)
        if sink:
            sink.add(rows[-1])
    _repatch(model, "dense", {})
    return add_sdpa_ratios(rows)


def _repatch(model, method: str, overrides: dict) -> str | None:
    """Undo the current patch and apply ``method`` (dense: none); the error of a refused patch, else None."""
    if get_handle(model) is not None:
        unpatch(model)
    if method == "dense":
        return None
    try:
        patch(model, method, **overrides)
    except Exception as err:  # an unknown method or option: its rows say so, the other methods run
        return "patch failed: " + describe(err)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("patchattn bench generate needs a CUDA GPU (or --device cpu with a small --shape)", file=sys.stderr)
        return 2
    if args.profile_step:
        from .generate_profile import main_profile

        return main_profile(args)
    sink = CsvSink(args.csv)
    rows = run(args, sink)
    sink.rewrite(rows)
    print(format_table(rows, [c for c in COLUMNS if c != "tokens_hash"]))
    if args.plot:
        from .generate_plot import plot

        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
