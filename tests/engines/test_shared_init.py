"""Every client of a round without a global adapter starts from the round's one fresh adapter.

Before this, each round-1 client drew its own random ``A``, and the factor-averaging aggregators
(FedAvg, FedIT, HetLoRA) averaged independent draws: the global ``A`` shrank by about
``1/sqrt(K)`` for ``K`` clients (see docs/BENCHMARKS.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_common import TINY

from flexlora.core.initial import initial_A
from flexlora.engines.config import load_config
from flexlora.engines.simulation import Simulation
from flexlora.methods import unpack_factors

# lr 1e-30 moves no float32 entry of A (its steps are far below A's rounding unit), so what the
# clients return is where they started.
FROZEN = ["train.lr=1e-30", "eval.every=0", "eval.baseline=false", "eval.per_type=false"]


def _init(task) -> dict:
    """The global factors a task sends its client ({} when it starts from a fresh adapter)."""
    return unpack_factors(task.tensors, "init/")


def _seed(task) -> int | None:
    """The seed of the round's shared fresh adapter (None: none shared)."""
    return task.meta.get("init_seed")


def _sim(tmp_path: Path, name: str, *extra: str) -> Simulation:
    return Simulation(load_config(None, [*TINY, *FROZEN, *extra]), tmp_path / name, progress=False,
                      log=lambda m: None)


@pytest.fixture(scope="module")
def fedit(tmp_path_factory) -> tuple[Simulation, list]:
    """One round of FedIT (homogeneous rank 4, AdamW) and the tasks of its round 1."""
    sim = _sim(tmp_path_factory.mktemp("fedit"), "run", "rounds=1", "aggregator=fedavg", "rank_distribution=homo")
    tasks = sim.plan_round(1)
    sim.run()
    return sim, tasks


def test_fedit_round_one_aggregate_is_the_shared_initial_adapter(fedit) -> None:
    sim, tasks = fedit
    assert len(tasks) == 3 and all(not _init(t) for t in tasks)
    assert len({_seed(t) for t in tasks}) == 1 and _seed(tasks[0]) is not None
    for m, st in sim.state.modules.items():
        expected = initial_A(st.shape, st.A.shape[0], _seed(tasks[0]), m)
        # The size-weighted average of identical A is that A (to the rounding of the weights);
        # with independent draws its norm would be about 1/sqrt(3) of one draw's.
        torch.testing.assert_close(st.A, expected, rtol=1e-6, atol=0)
        assert st.B.abs().max() < 1e-20


def test_round_one_clients_of_different_ranks_start_from_nested_adapters(tmp_path: Path) -> None:
    sim = _sim(tmp_path, "flex", "rounds=1")
    tasks = sim.plan_round(1)
    assert len({_seed(t) for t in tasks}) == 1
    by_rank = {}
    for t in tasks:
        by_rank.setdefault(tuple(sorted(t.spec.ranks.values())), t)
    assert len(by_rank) >= 2, "the test needs clients of two different ranks in round 1"
    got = []
    for t in by_rank.values():
        got.append(unpack_factors(sim.train_client(t).tensors))
    small, large = sorted(got, key=lambda f: sum(a.shape[0] for a, _ in f.values()))[:2]
    for m, (a, _) in small.items():
        a_large = large[m][0]
        r = min(a.shape[0], a_large.shape[0])
        assert torch.equal(a[:r], a_large[:r]), m


def test_later_rounds_start_from_the_global_or_a_new_shared_fresh_adapter(fedit, tmp_path: Path) -> None:
    assert all(_init(t) and "init_seed" not in t.meta for t in fedit[0].plan_round(2))
    flora = _sim(tmp_path, "flora", "rounds=1", "aggregator=flora")
    first = _seed(flora.plan_round(1)[0])
    flora.run()
    second = flora.plan_round(2)
    # FLoRA merges the global into the base and trains a fresh adapter every round: one per round.
    assert all(not _init(t) and unpack_factors(t.tensors, "base/") for t in second)
    assert len({_seed(t) for t in second}) == 1 and _seed(second[0]) not in (None, first)


def test_per_client_init_gives_each_client_of_a_round_its_own_start(tmp_path: Path) -> None:
    sim = _sim(tmp_path, "flex", "rounds=1", "lora.init=per-client")
    tasks = sim.plan_round(1)
    assert all(not _init(t) and _seed(t) is None for t in tasks)
    got = [unpack_factors(sim.train_client(t).tensors) for t in tasks[:2]]
    for m in got[0]:
        a0, a1 = got[0][m][0], got[1][m][0]
        r = min(a0.shape[0], a1.shape[0])
        # Independent draws of the same law: no shared rows, unlike the shared start's nested A.
        assert not torch.equal(a0[:r], a1[:r]), m
        assert not torch.allclose(a0[:r], a1[:r], atol=1e-3), m
    # Later rounds still start from the distributed global.
    sim.run()
    assert all(_init(t) and "init_seed" not in t.meta for t in sim.plan_round(2))


@pytest.mark.parametrize("aggregator", ["fedavg", "fedit", "hetlora"])
def test_per_client_init_is_refused_for_factor_averaging(aggregator: str) -> None:
    from flexlora.engines.config import ConfigError

    with pytest.raises(ConfigError, match=r"lora.init.*average independent random A.*lora.init='shared'"):
        load_config(None, [*TINY, f"aggregator={aggregator}", "lora.init=per-client"])
    with pytest.raises(ConfigError, match="lora.init.*one of"):
        load_config(None, [*TINY, "lora.init=random"])
    for ok in ("flexlora", "flora", "slora"):
        assert load_config(None, [*TINY, f"aggregator={ok}", "lora.init=per-client"]).lora.init == "per-client"
