"""Client partitions: coverage, non-empty clients, method semantics, manifests."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexlora.data import (
    DataError,
    Example,
    Partition,
    TaskData,
    load_demo_tasks,
    partition_examples,
)


def make_data(sizes: list[int]) -> TaskData:
    """Tasks ``t0, t1, ...`` with the given numbers of examples."""
    train = {
        f"t{j}": [
            Example(id=f"t{j}-{i}", instruction="i", input=str(i), output="o", task=f"t{j}")
            for i in range(n)
        ]
        for j, n in enumerate(sizes)
    }
    return TaskData(train=train, unseen={}, name=f"synthetic{sizes}")


def task_of(example_id: str) -> str:
    return example_id.split("-")[0]


@pytest.fixture(scope="module")
def demo():
    return load_demo_tasks(train_per_task=20, unseen_per_task=2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=8),
    clients=st.integers(min_value=1, max_value=60),
    method=st.sampled_from(["natural", "dirichlet", "iid"]),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    alpha=st.floats(min_value=0.01, max_value=100.0),
)
def test_every_example_assigned_exactly_once(sizes, clients, method, seed, alpha) -> None:
    data = make_data(sizes)
    clients = min(clients, sum(sizes))
    part = partition_examples(data, clients, method, alpha=alpha, seed=seed)
    assigned = [i for c in part.clients for i in c]
    assert sorted(assigned) == sorted(ex.id for ex in data.iter_train())
    assert part.num_clients == clients
    assert all(part.num_examples(k) >= 1 for k in range(clients))
    part.verify(data)
    # Deterministic for a seed.
    assert partition_examples(data, clients, method, alpha=alpha, seed=seed) == part
    if method == "natural":
        tasks_per_client = [{task_of(i) for i in c} for c in part.clients]
        if clients >= len(sizes):
            assert all(len(t) == 1 for t in tasks_per_client)
        else:
            # Whole tasks: every task sits in exactly one client.
            owner = Counter(t for ts in tasks_per_client for t in ts)
            assert set(owner.values()) == {1}
    else:
        assert max(part.sizes()) - min(part.sizes()) <= 1


def test_natural_one_task_per_client(demo) -> None:
    part = partition_examples(demo, len(demo.train), "natural")
    assert [{task_of_demo(i) for i in c} for c in part.clients] == [
        {t} for t in sorted(demo.train)
    ]
    assert part.sizes() == [20] * len(demo.train)
    got = part.client_examples(demo, 0)
    assert got == demo.train[sorted(demo.train)[0]]


def task_of_demo(example_id: str) -> str:
    return example_id.rsplit("-", 1)[0].removeprefix("demo-")


def test_natural_fewer_clients_round_robin(demo) -> None:
    part = partition_examples(demo, 4, "natural", seed=1)
    tasks = [{task_of_demo(i) for i in c} for c in part.clients]
    counts = sorted(len(t) for t in tasks)
    assert counts[-1] - counts[0] <= 1 and sum(counts) == len(demo.train)
    assert partition_examples(demo, 4, "natural", seed=2).clients != part.clients


def test_natural_more_clients_shards_proportionally() -> None:
    data = make_data([40, 10])
    part = partition_examples(data, 5, "natural", seed=0)
    tasks = [task_of(c[0]) for c in part.clients]
    # 5 shards over sizes 40 and 10: the big task gets 4 shards of 10, the small one 1.
    assert Counter(tasks) == {"t0": 4, "t1": 1}
    assert part.sizes() == [10] * 5
    assert all({task_of(i) for i in c} == {tasks[k]} for k, c in enumerate(part.clients))


def test_natural_min_per_client_violation() -> None:
    with pytest.raises(DataError, match="min_per_client"):
        partition_examples(make_data([10, 1]), 2, "natural", min_per_client=2)


def mean_max_share(part: Partition) -> float:
    shares = []
    for c in part.clients:
        counts = Counter(task_of_demo(i) for i in c)
        shares.append(max(counts.values()) / len(c))
    return statistics.mean(shares)


def test_dirichlet_small_alpha_is_more_skewed(demo) -> None:
    skewed = statistics.mean(
        mean_max_share(partition_examples(demo, 10, "dirichlet", alpha=0.05, seed=s))
        for s in range(3)
    )
    flat = statistics.mean(
        mean_max_share(partition_examples(demo, 10, "dirichlet", alpha=100.0, seed=s))
        for s in range(3)
    )
    uniform_share = 1 / len(demo.train)
    assert skewed > 2 * flat
    assert flat < 4 * uniform_share
    # Near-iid with large alpha: every client sees most tasks.
    part = partition_examples(demo, 10, "dirichlet", alpha=100.0)
    assert min(len({task_of_demo(i) for i in c}) for c in part.clients) >= len(demo.train) // 2


def test_dirichlet_params_recorded(demo) -> None:
    part = partition_examples(demo, 3, "dirichlet", alpha=0.3, seed=9)
    assert part.method == "dirichlet" and part.seed == 9 and part.params["alpha"] == 0.3
    assert part.source == demo.name


def test_iid_sizes(demo) -> None:
    part = partition_examples(demo, 7, "iid", seed=3)
    assert max(part.sizes()) - min(part.sizes()) <= 1
    assert sum(part.sizes()) == demo.num_train
    # Shuffled, not contiguous task blocks.
    assert len({task_of_demo(i) for i in part.clients[0]}) > 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 0}, "num_clients"),
        ({"num_clients": 10_000}, "training examples"),
        ({"num_clients": 2, "method": "random"}, "unknown partition method"),
        ({"num_clients": 2, "method": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"num_clients": 2, "method": "dirichlet", "alpha": -1.0}, "alpha"),
        ({"num_clients": 2, "min_per_client": 0}, "min_per_client"),
    ],
)
def test_errors(demo, kwargs, match) -> None:
    with pytest.raises(DataError, match=match):
        partition_examples(demo, **kwargs)


def test_manifest_hash_stable_and_sensitive(demo) -> None:
    a = partition_examples(demo, 5, "iid", seed=1)
    b = partition_examples(demo, 5, "iid", seed=1)
    c = partition_examples(demo, 5, "iid", seed=2)
    assert a.manifest()["hash"] == b.manifest()["hash"]
    assert a.manifest()["hash"] != c.manifest()["hash"]
    moved = Partition(
        clients=[a.clients[0][1:], [a.clients[0][0], *a.clients[1]], *a.clients[2:]],
        method=a.method,
        seed=a.seed,
        params=a.params,
        source=a.source,
    )
    assert moved.manifest()["hash"] != a.manifest()["hash"]
    m = a.manifest()
    assert m["clients"]["3"] == a.clients[3]
    assert m["num_clients"] == 5 and m["sizes"] == a.sizes()
    assert m["source"] == demo.name


def test_save_load_round_trip(demo, tmp_path: Path) -> None:
    part = partition_examples(demo, 6, "dirichlet", alpha=0.5, seed=4)
    path = part.save(tmp_path / "sub" / "partition.json")
    assert not [p for p in path.parent.iterdir() if p.name != "partition.json"]  # no temp left
    loaded = Partition.load(path)
    assert loaded == part
    assert loaded.all_client_examples(demo) == part.all_client_examples(demo)


def test_corrupted_manifest_rejected(demo, tmp_path: Path) -> None:
    part = partition_examples(demo, 3, "iid")
    path = part.save(tmp_path / "p.json")
    manifest = json.loads(path.read_text())
    manifest["clients"]["1"].append(manifest["clients"]["0"].pop())
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="hash mismatch") as err:
        Partition.load(path)
    assert str(path) in str(err.value)

    path.write_text(path.read_text()[:-20])
    with pytest.raises(DataError, match="not valid JSON"):
        Partition.load(path)

    path.write_text(json.dumps({"method": "iid"}))
    with pytest.raises(DataError, match="lacks"):
        Partition.load(path)

    with pytest.raises(DataError, match="does not exist"):
        Partition.load(tmp_path / "absent.json")


def test_partition_against_other_data_rejected(demo) -> None:
    part = partition_examples(demo, 3, "iid")
    other = load_demo_tasks(train_per_task=5, unseen_per_task=2)
    with pytest.raises(DataError, match="partition does not match"):
        part.verify(other)
    with pytest.raises(DataError, match="not a training example"):
        part.all_client_examples(other)


def test_task_counts(demo) -> None:
    part = partition_examples(demo, len(demo.train), "natural")
    counts = part.task_counts(demo)
    assert counts[0] == {sorted(demo.train)[0]: 20}
