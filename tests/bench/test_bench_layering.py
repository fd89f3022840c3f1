"""Layering: bench sits on top of the engines and below the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import flexlora

PKG = Path(flexlora.__file__).resolve().parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_bench_imports_engines_never_the_cli():
    files = sorted((PKG / "bench").glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "grid.py", "quality.py", "report.py"}
    used = set().union(*(_imports(f) for f in files))
    assert not any(n == "flexlora.cli" or n.startswith("flexlora.cli.") for n in used)
    assert any(n.startswith("flexlora.engines") for n in used)


def test_lower_layers_never_import_bench():
    for layer in ("core", "data", "training", "engines"):
        for f in sorted((PKG / layer).rglob("*.py")):
            bad = [n for n in _imports(f) if n == "flexlora.bench" or n.startswith("flexlora.bench.")]
            assert not bad, f"{f} imports {bad}"
