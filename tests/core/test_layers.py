"""The layers of docs/design.md hold: no module imports a layer above its own (at module level or inside a
function), and the engine folder's package imports nothing that reads or makes engines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "catome_export"
ORDER = ("models", "merging", "eager", "engine", "export", "backends", "runtime", "workflows", "serve", "cli")
"""Bottom to top (docs/design.md); bench sits beside workflows and is checked for the engine below."""
ENGINE_MAY_NOT_IMPORT = ("export", "backends", "runtime", "workflows", "serve", "cli", "bench", "analysis",
                         "evaluation", "lora.refit", "lora.trt_refit", "lora.weights")


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
    return [(line, name) for line, name in out if name.startswith("catome_export.")]


def _modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


def test_the_layer_list_names_real_packages():
    for layer in ORDER:
        assert _modules(layer), f"catome_export/{layer} has no modules"


@pytest.mark.parametrize("layer", ORDER)
def test_no_import_goes_up(layer):
    above = ORDER[ORDER.index(layer) + 1:]
    found = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}" for path in _modules(layer)
             for line, name in _imports(path) if name.split(".")[1] in above]
    assert not found, "\n".join(found)


def test_engine_imports_nothing_that_makes_or_reads_engines():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}" for path in _modules("engine")
             for line, name in _imports(path)
             if any(name == f"catome_export.{bad}" or name.startswith(f"catome_export.{bad}.")
                    for bad in ENGINE_MAY_NOT_IMPORT)]
    assert not found, "\n".join(found)


def test_the_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from catome_export.runtime import Runtime\n")
    assert _imports(source) == [(2, "catome_export.runtime")]
