"""A client update that is finite but too large for float32 is dropped by name, and a global
state that is not finite is never installed or checkpointed over the previous round's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_common import TINY

from flexlora.core.types import ClientUpdate
from flexlora.engines.checkpoint import load_checkpoint
from flexlora.engines.config import load_config
from flexlora.engines.federation import FederationError
from flexlora.engines.simulation import ClientOutcome, LocalEngine, Simulation
from flexlora.methods import ClientReply, pack_factors, unpack_factors

QUIET = ["eval.every=0", "eval.baseline=false", "eval.per_type=false", "rounds=2"]


class _Tampering(LocalEngine):
    """The local engine, with the ``index``-th reply of round 2 changed by ``tamper(outcome)``;
    ``victim`` is that client."""

    def __init__(self, index: int, tamper) -> None:
        super().__init__(progress=False)
        self.index, self.tamper = index, tamper

    def train_round(self, fed, rnd, tasks):
        for i, o in enumerate(super().train_round(fed, rnd, tasks)):
            if rnd == 2 and i == self.index:
                self.victim = o.task.spec.client_id
                self.tamper(o)
            yield o


def _inflate(o) -> None:
    # Every factor times 1e25: finite float32 values whose products (1e50) overflow float32.
    o.reply.tensors = {k: t * 1e25 for k, t in o.reply.tensors.items()}
    assert all(bool(torch.isfinite(t).all()) for t in o.reply.tensors.values())


def _metrics(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def test_an_update_too_large_for_float32_is_dropped_by_name(tmp_path: Path) -> None:
    sim = Simulation(load_config(None, [*TINY, *QUIET]), tmp_path / "r", progress=False, log=lambda m: None)
    engine = _Tampering(0, _inflate)
    sim.run(engine)
    dropped = _metrics(sim.run_dir)[-1]["dropped"]
    assert [d["client"] for d in dropped] == [engine.victim]
    assert "too large to aggregate in float32" in dropped[0]["reason"] and "module '" in dropped[0]["reason"]
    assert sim.state is not None and sim.state.nonfinite_modules() == []


def test_a_non_finite_aggregate_is_not_installed_and_round_1_stays_checkpointed(tmp_path: Path) -> None:
    # With the method's and the aggregator's own checks off, the overflow reaches the aggregate;
    # the federation's last guard must still refuse to install and checkpoint it.
    cfg = load_config(None, [*TINY, *QUIET])
    sim = Simulation(cfg, tmp_path / "r", progress=False, log=lambda m: None)
    sim.method.aggregator.check_finite = False
    sim.method.read_reply = lambda task, reply: ClientUpdate(unpack_factors(reply.tensors), reply.num_examples,
                                                             alpha=reply.meta["alpha"])
    with pytest.raises(FederationError, match="round 2: the aggregated global update is not finite") as exc:
        sim.run(_Tampering(0, _inflate))
    assert f"--resume {sim.run_dir}" in str(exc.value)
    ckpt = load_checkpoint(sim.run_dir / "checkpoints")
    assert ckpt["round"] == 1
    tensors = [t for m in ckpt["global_state"]["modules"].values() for t in m["tensors"].values()]
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors)
    assert [r["round"] for r in _metrics(sim.run_dir)] == [1]
    assert sim.state is not None and sim.state.nonfinite_modules() == []  # round 1's state, still installed


def test_a_reply_labelled_for_another_client_is_dropped(tmp_path: Path) -> None:
    sim = Simulation(load_config(None, [*TINY, *QUIET]), tmp_path / "r", progress=False, log=lambda m: None)
    engine = _Tampering(1, lambda o: o.reply.meta.update(client_id="client09999"))
    sim.run(engine)
    dropped = _metrics(sim.run_dir)[-1]["dropped"]
    assert [d["client"] for d in dropped] == [engine.victim]
    assert dropped[0]["reason"] == f"the reply is labelled 'client09999', but the task was {engine.victim!r}'s"


@pytest.mark.parametrize("count", [0, 10_000, True])
def test_a_reply_claiming_another_example_count_is_dropped(tmp_path: Path, count) -> None:
    # The count is the client's weight: a reply whose count is not its partition's size is dropped.
    sim = Simulation(load_config(None, [*TINY, *QUIET]), tmp_path / "r", progress=False, log=lambda m: None)
    engine = _Tampering(1, lambda o: setattr(o.reply, "num_examples", count))
    sim.run(engine)
    dropped = _metrics(sim.run_dir)[-1]["dropped"]
    assert [d["client"] for d in dropped] == [engine.victim]
    k = int(engine.victim.removeprefix("client"))
    held = sim.partition.num_examples(k)
    assert held not in (0, 10_000, 1)
    want = (f"partition {k} of the run's data holds {held}" if count == 10_000
            else "num_examples must be a positive integer")
    assert want in dropped[0]["reason"], dropped[0]


def test_the_count_check_agrees_with_the_partition_and_spares_own_data(tmp_path: Path) -> None:
    sim = Simulation(load_config(None, [*TINY, *QUIET]), tmp_path / "r", progress=False, log=lambda m: None)
    task = sim.plan_round(1)[0]
    factors = {m: (torch.zeros(r, sim.shapes[m][1]), torch.zeros(sim.shapes[m][0], r))
               for m, r in task.spec.ranks.items()}
    held = sim.partition.num_examples(task.client)
    assert held == len(sim.client_examples(task.client))
    assert sim.check_count(task, held) is None
    assert f"claims {held + 1} training examples" in sim.check_count(task, held + 1)
    wrong = ClientReply(pack_factors(factors), held + 1, {"alpha": task.spec.alpha, "rslora": False})
    fold = sim.begin_aggregation(1, [task])
    fold.add(ClientOutcome(task, wrong))
    assert [d["client"] for d in fold.dropped] == [task.spec.client_id]
    # A node on a data set of its own: the server cannot know its size, so the count is trusted.
    fold = sim.begin_aggregation(1, [task])
    fold.add(ClientOutcome(task, wrong, own_data=True))
    assert fold.dropped == [] and len(fold.valid) == 1

