"""The method files keep to their layer: no method imports another method, a private name, or a layer above."""

import ast
import pathlib

import pytest

METHODS_DIR = pathlib.Path(__file__).resolve().parents[2] / "patchattn" / "methods"
SHARED = {"_sparse", "_heads", "_rows", "_shared", "_budget", "_kept", "_dit", "_dit_routing",
          "_lastrow", "_lightning", "_perforward"}
ABOVE = {"calibrate", "api", "adapters", "train", "eval", "bench", "cli", "demo", "lm_eval", "report"}


def _imports(path: pathlib.Path):
    """(module as written with its leading dots, imported names) of every import in the file, nested ones too."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            yield "." * node.level + (node.module or ""), [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


FILES = sorted(p for p in METHODS_DIR.glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_a_method_file_imports_no_sibling_method_no_private_name_and_no_upper_layer(path):
    for module, names in _imports(path):
        if module.startswith(".") and not module.startswith(".."):  # inside patchattn.methods
            sibling = module[1:].split(".")[0]
            assert sibling in SHARED, f"{path.name} imports the method module {module!r}"
        top = module.lstrip(".").split(".")[0] if module.startswith("..") else None
        if module.startswith("patchattn"):
            top = module.split(".")[1] if "." in module else "patchattn"
        assert top not in ABOVE and top != "patchattn", f"{path.name} imports {module!r}, a layer above the methods"
        private = [n for n in names if n.startswith("_") and n != "__future__"]
        assert not private, f"{path.name} imports private names {private} from {module!r}"


def test_the_check_sees_the_imports_it_forbids(tmp_path):
    """The walk finds nested imports, so a violation inside a function is not missed."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from .streaming import _x\n    from ..calibrate import load_artifact\n")
    assert list(_imports(bad)) == [(".streaming", ["_x"]), ("..calibrate", ["load_artifact"])]
