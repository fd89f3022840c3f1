"""scripts/gpu-check.sh in its dry run: every step runs on the CPU at toy size, each is recorded
with its exit code, and the figures land under the one output folder (slow: about two minutes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_runs_every_step_into_one_folder(tmp_path: Path) -> None:
    out = tmp_path / "check"
    env = {**os.environ, "DRY_RUN": "1", "PY": sys.executable}
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and every step it started
        proc.communicate()
        pytest.fail("the dry run did not finish within 900 s")
    assert proc.returncode == 0, stdout[-3000:]
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()[1:]]
    assert [s[0] for s in steps] == ["environment", "cuda-tests", "aggregation", "demo-round", "grid-slice"]
    assert all(rc == "0" for _, rc, _ in steps), steps
    assert "cuda available False" in (out / "environment.txt").read_text()
    assert "skipped" in (out / "cuda-tests.txt").read_text()  # no CUDA here: recorded, not hidden
    rows = json.loads((out / "aggregation.json").read_text())
    assert rows and all(r["max_rel_diff"] < 1e-4 for r in rows)
    assert (out / "demo" / "metrics.jsonl").is_file() and (out / "demo" / "eval").is_dir()
    assert (out / "grid" / "results.md").is_file()
