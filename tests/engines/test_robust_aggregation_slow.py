"""A poisoning client on SmolLM2-135M (slow): the eval loss on the unseen tasks of a run with one
client replying -1000x its update, with and without the bound, against the clean run."""

from __future__ import annotations

import json
from pathlib import Path

import faults_plan
import pytest

from flexlora.engines import faults
from flexlora.engines.config import load_config
from flexlora.engines.simulation import Simulation

# `long`: CI leaves it out (three SmolLM2 runs, 3-10 minutes); the tiny-model poisoning tests and the
# poisoning loopback deployment cover the bound there. `make test-slow` runs it.
pytestmark = [pytest.mark.slow, pytest.mark.long]

SETS = ["rounds=2", "num_clients=3", "clients_per_round=3", "local_steps=4", "train.lr=1e-3", "eval.every=2",
        "eval.baseline=false", "eval.per_type=false", "eval.max_tasks=2", "eval.max_examples_per_task=3",
        "eval.max_new_tokens=1"]


def _run(tmp_path: Path, name: str, extra: list[str], poisoner: int | None = None) -> list[dict]:
    faults.clear_hooks()
    if poisoner is not None:
        faults_plan.install_local_poison(poisoner, -1000.0)
    try:
        sim = Simulation(load_config(None, [*SETS, *extra]), tmp_path / name, progress=False, log=lambda m: None)
        sim.run()
    finally:
        faults.clear_hooks()
    return [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_bound_keeps_the_eval_loss_of_a_poisoned_run_near_the_clean_one(tmp_path: Path) -> None:
    # A bound that clips nobody: the clean run, with every client's norm recorded.
    clean = _run(tmp_path, "clean", ["privacy.clip_norm=1e9"])
    r1, r2 = (r for r in clean if r["round"] > 0)
    both = [c for c in r1["clients"] if c in r2["clients"]]
    assert both, "no client is sampled in both rounds; pick another seed"
    poisoner = int(both[0].removeprefix("client"))
    honest = sorted(c["norm"] for k, c in r1["clip"].items() if k != both[0])
    bound = honest[len(honest) // 2]
    poisoned = _run(tmp_path, "poisoned", [], poisoner)
    bounded = _run(tmp_path, "bounded", [f"privacy.clip_norm={bound!r}"], poisoner)
    loss = {"clean": clean[-1]["eval_loss"], "poisoned": poisoned[-1]["eval_loss"], "bounded": bounded[-1]["eval_loss"]}
    assert bounded[-1]["clip"][both[0]]["clipped"]
    # Unbounded, one client of three wrecks the model; bounded, the loss stays within a tenth of
    # that damage of the clean run's.
    assert loss["poisoned"] > loss["clean"] + 1.0, loss
    assert abs(loss["bounded"] - loss["clean"]) < 0.1 * (loss["poisoned"] - loss["clean"]), loss
    print(f"eval loss: {loss}")
