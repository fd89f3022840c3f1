"""Settings and helpers shared by the engine tests (in-process and Flower).

``tests/engines/conftest.py`` puts this folder on ``sys.path`` (pytest's default "prepend"
import mode does so for every folder with a conftest), so the Flower tests one level down import
it too.
"""

from __future__ import annotations

import os
import subprocess
import sys

# A federation that trains and evaluates in seconds: 4 clients of three types, 3 per round.
TINY = [
    "model=builtin:tiny-llama",
    "num_clients=4",
    "clients_per_round=3",
    "local_steps=3",
    "data_options.max_per_task=6",
    "train.micro_batch_size=2",
    "train.lr=5e-3",
    "train.cutoff_len=96",
    "eval.max_tasks=2",
    "eval.max_examples_per_task=2",
    "eval.max_new_tokens=4",
    "lora.types=[[2, 4], [4, 8], [8, 16]]",
]


def run_cli(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``flexlora ARGS`` in a child process (so that it can be SIGKILLed by a test hook), bounded in time."""
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "flexlora.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def run_local(tmp_path, name: str, sets: list[str], *, resume: bool = False):
    """A finished in-process run of ``TINY`` plus ``sets`` in ``tmp_path / name`` (quiet)."""
    from flexlora.engines.config import load_config
    from flexlora.engines.simulation import Simulation

    sim = Simulation(load_config(None, [*TINY, *sets]), tmp_path / name, resume=resume, progress=False,
                     log=lambda m: None)
    sim.run()
    return sim


def run_metrics(sim) -> list[dict]:
    """The records of a run's ``metrics.jsonl``."""
    import json

    return [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
