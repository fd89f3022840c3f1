"""The data layer stays below training/engines/cli and does not need transformers or torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import flexlora

DATA_DIR = Path(flexlora.__file__).resolve().parent / "data"
FORBIDDEN = ("flexlora.training", "flexlora.engines", "flexlora.cli", "transformers", "datasets")


def test_no_upward_or_heavy_imports_in_source() -> None:
    for path in DATA_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"


def test_import_pulls_in_neither_transformers_nor_torch() -> None:
    # A bare stand-in for the flexlora package skips its own (torch-based) __init__.
    code = (
        "import sys, types; pkg = types.ModuleType('flexlora');"
        f"pkg.__path__ = [{str(DATA_DIR.parent)!r}];"
        "sys.modules['flexlora'] = pkg;"
        "import flexlora.data;"
        "flexlora.data.load_demo_tasks();"
        "heavy = [m for m in ('transformers', 'torch', 'datasets', 'huggingface_hub')"
        " if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
