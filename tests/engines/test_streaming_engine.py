"""The in-process engine aggregates by streaming: each client's update is folded into the running
aggregate (and its factors released) before the next client trains, and a run folded in any
order gives the batch aggregation of the same replies."""

from __future__ import annotations

from pathlib import Path

import torch
from engine_common import TINY

from flexlora.core.aggregators import dense_update
from flexlora.engines.config import load_config
from flexlora.engines.simulation import LocalEngine, Simulation

QUIET = ["eval.every=0", "eval.baseline=false", "eval.per_type=false", "rounds=2"]


class _Watching(LocalEngine):
    """The local engine, checking at each yield that every earlier outcome was already folded."""

    def __init__(self) -> None:
        super().__init__(progress=False)
        self.seen: list = []

    def train_round(self, fed, rnd, tasks):
        for o in super().train_round(fed, rnd, tasks):
            assert all(prev.reply is None for prev in self.seen), "an earlier reply is still held"
            self.seen.append(o)
            yield o


def test_updates_are_folded_and_released_one_by_one(tmp_path: Path) -> None:
    sim = Simulation(load_config(None, [*TINY, *QUIET]), tmp_path / "r", progress=False, log=lambda m: None)
    engine = _Watching()
    sim.run(engine)
    assert len(engine.seen) == 6 and all(o.reply is None for o in engine.seen)


def test_a_round_folded_in_reverse_equals_the_batch_aggregation(tmp_path: Path) -> None:
    sim = Simulation(load_config(None, [*TINY, *QUIET]), tmp_path / "r", progress=False, log=lambda m: None)
    tasks = sim.plan_round(1)
    outcomes = list(LocalEngine(progress=False).train_round(sim, 1, tasks))
    updates = [sim.method.read_reply(o.task, o.reply) for o in outcomes]
    batch = sim.method.aggregator.aggregate(updates)
    fold = sim.begin_aggregation(1, tasks)
    for o in reversed(outcomes):
        fold.add(o)
    rec = fold.finish()
    assert rec["clients"] == [t.spec.client_id for t in tasks]  # the record keeps the tasks' order
    for m in sim.shapes:
        d, ref = dense_update(sim.state, m), dense_update(batch, m)
        assert float(torch.linalg.norm(d - ref) / torch.linalg.norm(ref)) <= 1e-5, m
