"""Helpers of the bench tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_bench(args: list[str], env_extra: dict[str, str] | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """``flexlora bench quality ARGS`` in a child process (it may be SIGKILLed by the engine's test hook)."""
    env = {k: v for k, v in os.environ.items() if k != "FLEXLORA_KILL_AT"}
    # One torch thread: on the shared 2-core machine, where other test runs compete for the cores,
    # two OpenMP threads spin-wait for each other and the smoke grid takes minutes instead of ~40 s.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "flexlora.cli.main", "bench", "quality", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def tail(proc: subprocess.CompletedProcess, n: int = 4000) -> str:
    return f"rc={proc.returncode}\nstdout:\n{proc.stdout[-n:]}\nstderr:\n{proc.stderr[-n:]}"


def results_ids(out: Path) -> list[str]:
    import json

    return [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
