"""The core is pure tensor maths: it imports neither transformers/peft/flwr nor the upper layers."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import flexlora

CORE_DIR = Path(flexlora.__file__).resolve().parent / "core"
BLOCKED = ("transformers", "peft", "flwr")
UPPER = ("flexlora.data", "flexlora.training", "flexlora.engines", "flexlora.cli")


def _imported_names(tree: ast.AST, package: str) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the file's package
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module or "")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            names += [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return names


def test_core_sources_import_nothing_heavy_or_upward():
    files = sorted(CORE_DIR.rglob("*.py"))
    assert len(files) >= 10  # types, lowrank, distributions, aggregators/*
    for path in files:
        rel = path.relative_to(CORE_DIR.parent.parent).with_suffix("")
        package = ".".join(rel.parts[:-1])  # the package holding the file (itself for __init__)
        for name in _imported_names(ast.parse(path.read_text(), filename=str(path)), package):
            top = name.split(".")[0]
            assert top not in BLOCKED, f"{path}: imports {name}"
            assert not any(name == u or name.startswith(u + ".") for u in UPPER), f"{path}: imports {name}"


def test_ast_checker_catches_forbidden_imports():
    # guard that the static check above can fail
    for src in ("import transformers", "from peft import LoraConfig", "from flexlora.training import x",
                "import flwr.client", "importlib.import_module('transformers')"):
        names = _imported_names(ast.parse(src), "flexlora.core")
        assert any(n.split(".")[0] in BLOCKED or n.startswith(UPPER) for n in names), src
    assert _imported_names(ast.parse("from ..training import x"), "flexlora.core") == ["flexlora.training"]


_BLOCKER = """
import importlib.abc, json, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'{{name}} is blocked in this test')
        return None
sys.meta_path.insert(0, Block())
for m in list(sys.modules):
    if m.split('.')[0] in BLOCKED:
        del sys.modules[m]
{body}
"""


def _run(body: str) -> subprocess.CompletedProcess:
    code = _BLOCKER.format(blocked=BLOCKED, body=body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_core_imports_with_transformers_peft_flwr_blocked():
    body = """
import flexlora.core
import flexlora
from flexlora.core import FlexLoRA, ClientUpdate
import torch
u = ClientUpdate({'m': (torch.randn(2, 6), torch.randn(5, 2))}, num_examples=3)
s = FlexLoRA().aggregate([u])
FlexLoRA().distribute(s, 2)
flexlora.sample_client_types(4, 'uniform')
loaded = sorted(m for m in sys.modules
                if m.split('.')[0] in BLOCKED
                or any(m == u or m.startswith(u + '.') for u in ('flexlora.data', 'flexlora.training',
                                                                  'flexlora.engines', 'flexlora.cli')))
print(json.dumps(loaded))
"""
    out = _run(body)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_blocker_is_effective():
    # guard: the finder really blocks, so the test above would fail if the core imported them
    for mod in BLOCKED:
        out = _run(f"import {mod}")
        assert out.returncode != 0 and "blocked in this test" in out.stderr, mod
