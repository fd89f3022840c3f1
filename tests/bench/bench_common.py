"""Helpers of the bench tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_bench(args: list[str], env_extra: dict[str, str] | None = None,
              timeout: float = 600, plan: str | None = None) -> subprocess.CompletedProcess:
    """``flexlora bench quality ARGS`` in a child process; ``plan``: the test seam's fault plan it
    installs (tests/seam/faults_plan.py; e.g. ``"kill-after-client=2:1"`` SIGKILLs it mid-round)."""
    import faults_plan

    env = {k: v for k, v in os.environ.items() if k != "FLEXLORA_TEST_SEAM"}
    # One torch thread: on the shared 2-core machine, where other test runs compete for the cores,
    # two OpenMP threads spin-wait for each other and the smoke grid takes minutes instead of ~40 s.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(env_extra or {})
    if plan:
        env = faults_plan.seam_env(plan, env)
    return subprocess.run([sys.executable, "-m", "flexlora.cli.main", "bench", "quality", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def tail(proc: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-n:]}\nstderr:\n{proc.stderr[-n:]}"


def results_ids(out: Path) -> list[str]:
    import json

    return [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
