"""One-way layers: kernels <- methods <- adapters/api <- train/eval/bench/cli, read from the source with ``ast``.

Every ``import``/``from ... import`` of a ``patchattn`` module counts, at module level or inside a function (an
import inside a function is still a dependency; it only hides the cycle until the function runs).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "patchattn"

# Everything below ``methods`` (what a method may build on).
BELOW_METHODS = ("kernels", "masks", "config", "registry", "state", "checks")
APPLICATIONS = ("train", "eval", "bench", "cli", "calibrate", "demo")


def _module_name(path: Path) -> str:
    parts = ["patchattn", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    relative = name.split(".")[1:]
    base = ROOT.joinpath(*relative)
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _targets(module: str, is_package: bool, node) -> list[str]:
    """The patchattn modules one import statement reads (``from . import api`` reads ``patchattn.api``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "patchattn"]
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != "patchattn":
        return []
    submodules = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
    return submodules or [base]


def import_edges() -> list[tuple[str, str, int]]:
    """(importing module, imported module, line) for every patchattn import in the package."""
    edges = []
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, path.name == "__init__.py", node):
                    edges.append((module, target, node.lineno))
    return edges


def _top(module: str) -> str:
    """The top-level part a module belongs to: ``patchattn.eval.ppl`` -> ``eval``; the root package -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


EDGES = import_edges()


def _violations(sources, forbidden) -> list[str]:
    return [f"{src} -> {dst} (line {line})" for src, dst, line in EDGES
            if _top(src) in sources and _top(dst) in forbidden]


def test_the_scan_sees_the_known_edges():
    # Guards the parser itself: a scan that finds nothing would pass every rule below.
    tops = {(_top(s), _top(d)) for s, d, _ in EDGES}
    assert ("methods", "kernels") in tops
    assert ("api", "adapters") in tops
    assert ("cli", "api") in tops
    assert len(EDGES) > 100


def test_kernels_import_nothing_outside_kernels():
    bad = [f"{s} -> {d} (line {n})" for s, d, n in EDGES if _top(s) == "kernels" and _top(d) != "kernels"]
    assert not bad, "kernels must stand alone:\n" + "\n".join(bad)


def test_foundations_stay_below_methods():
    bad = _violations(BELOW_METHODS, ("methods", "adapters", "api", *APPLICATIONS, "lm_eval", "tasks", ""))
    assert not bad, "masks/config/registry/state must not import methods or anything above:\n" + "\n".join(bad)


def test_methods_import_no_application_layer():
    bad = _violations(("methods",), ("adapters", "api", "train", "eval", "bench", "cli", "demo", "lm_eval", "tasks"))
    assert not bad, "methods must not import adapters, api or applications:\n" + "\n".join(bad)


def test_methods_do_not_import_calibrate():
    bad = _violations(("methods",), ("calibrate",))
    assert not bad, "methods must not import calibrate:\n" + "\n".join(bad)


def test_adapters_and_api_import_no_application_layer():
    bad = _violations(("adapters", "api", "lvlm"), ("train", "eval", "bench", "cli", "calibrate", "demo", "lm_eval", "tasks"))
    assert not bad, "adapters/api must not import train/eval/bench/cli/calibrate/demo/lm_eval:\n" + "\n".join(bad)


def test_dit_helpers_sit_at_the_api_level():
    # patchattn/dit (guidance) may use methods and api; nothing at or below that level uses it.
    bad = _violations(("dit",), ("train", "eval", "bench", "cli", "calibrate", "demo", "lm_eval", "tasks"))
    bad += _violations(("kernels", "masks", "methods", "adapters", "api", *BELOW_METHODS), ("dit",))
    assert not bad, "patchattn/dit is at the api level:\n" + "\n".join(bad)
    assert ("calibrate", "dit") in {(_top(s), _top(d)) for s, d, _ in EDGES}  # the scan sees its users


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _top_level_graph(exclude_pair=None) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for src, dst, _ in EDGES:
        a, b = _top(src), _top(dst)
        # The root package is the facade that re-exports everything; '__main__' only runs the CLI.
        if a != b and "" not in (a, b) and (a, b) != exclude_pair:
            graph.setdefault(a, set()).add(b)
    return graph


def test_no_cycles_between_top_level_parts():
    cycles = _cycles(_top_level_graph())
    assert not cycles, f"import cycles between top-level parts of patchattn: {cycles}"


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_scanned_module_is_importable_by_name():
    # The scan resolves names like the import system does: each target is a real module of the package.
    missing = sorted({d for _, d, _ in EDGES if importlib.util.find_spec(d) is None})
    assert not missing, missing
