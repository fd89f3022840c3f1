"""The shape the method-object refactor promised, checked on the source tree:

- the committed benchmark rows keep their fingerprints (the identity a checkpoint or a bench row
  is matched by) under the new config layout;
- the methods sit below the engines (they import no engine, no CLI, no flwr);
- the engines and the Flower code never name a method (what differs between methods is the
  method's), and a Flower node imports nothing of the server's orchestration;
- no module of the library is over 800 lines and no class over 400.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import flexlora
from flexlora.engines.checkpoint import run_fingerprint
from flexlora.engines.config import load_config

SRC = Path(flexlora.__file__).resolve().parent
RESULTS = SRC.parent.parent / "docs" / "results"
METHOD_NAMES = re.compile(r"\b(slora|hetlora|flora|fedit|fedavg)\b|['\"]flexlora['\"]", re.IGNORECASE)


def _rows() -> list[dict]:
    return [json.loads(line) for p in sorted(RESULTS.glob("*/results.jsonl")) for line in p.read_text().splitlines()
            if line.strip()]


def test_every_committed_bench_row_keeps_its_fingerprint() -> None:
    rows = _rows()
    if not rows:
        pytest.skip(f"no committed results under {RESULTS}")
    assert len(rows) >= 10  # both quick grids, every method row among them
    methods = {r.get("method") or r.get("row") or r.get("id") for r in rows}
    assert len(methods) > 1
    for r in rows:
        assert run_fingerprint(load_config(None, r["config_sets"])) == r["fingerprint"], r["config_sets"]


def test_a_fingerprint_still_tells_runs_apart() -> None:
    base = run_fingerprint(load_config(None, ["aggregator=hetlora"]))
    for sets in (["hetlora.gamma=0.5"], ["hetlora.prune=false"], ["hetlora.weighting=\"size\""]):
        assert run_fingerprint(load_config(None, ["aggregator=hetlora", *sets])) != base, sets
    # The older keys and the new sections are one setting, so one identity.
    assert run_fingerprint(load_config(None, ["aggregator=hetlora", "train.hetlora_gamma=0.5"])) == \
        run_fingerprint(load_config(None, ["aggregator=hetlora", "hetlora.gamma=0.5"]))
    assert run_fingerprint(load_config(None, ['aggregator_options.remedy="server-memory"'])) == \
        run_fingerprint(load_config(None, ['flexlora.remedy="server-memory"'])) != \
        run_fingerprint(load_config(None, []))


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_methods_import_no_engine_cli_or_flower() -> None:
    files = sorted((SRC / "methods").glob("*.py"))
    assert len(files) >= 7
    for p in files:
        for name in _imports(p):
            assert not name.startswith(("flexlora.engines", "flexlora.cli", "flexlora.bench", "flwr")), (p, name)


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """Lines of code without comments and docstrings (where a method may be named as an example)."""
    tree = ast.parse(path.read_text())
    doc = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(
                getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            doc.update(range(body[0].lineno, body[0].end_lineno + 1))
    return [(i, line.split("#")[0]) for i, line in enumerate(path.read_text().splitlines(), 1) if i not in doc]


def test_the_engines_name_no_method() -> None:
    hits = [f"{p.relative_to(SRC)}:{i}: {line.strip()}" for p in sorted((SRC / "engines").rglob("*.py"))
            if p.name != "config.py" for i, line in _code_lines(p) if METHOD_NAMES.search(line)]
    assert hits == []


def test_the_name_check_can_fail() -> None:
    assert METHOD_NAMES.search('if cfg.aggregator == "slora":') and METHOD_NAMES.search("name = 'flexlora'")
    assert not METHOD_NAMES.search("from flexlora.methods import x")


def test_a_flower_node_imports_nothing_of_the_server() -> None:
    code = ("import sys; import flexlora.engines.flower.client_app; "
            "bad = [m for m in ('flexlora.engines.federation', 'flexlora.engines.rounds', 'flexlora.engines.evaluation', "
            "'flexlora.engines.flower.strategy', 'flexlora.engines.flower.server_app') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    pytest.importorskip("flwr")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_no_module_over_800_lines_and_no_class_over_400() -> None:
    for p in sorted(SRC.rglob("*.py")):
        text = p.read_text()
        assert len(text.splitlines()) <= 800, p
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno - node.lineno + 1 <= 400, (p, node.name)
