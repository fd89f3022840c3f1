"""Partition the training examples of a :class:`TaskData` over federated clients.

Three methods (every training example goes to exactly one client, every client gets at
least ``min_per_client`` examples, and the result is a pure function of the data, the
number of clients and the seed):

``natural``
    Clients follow tasks (the FlexLoRA protocol: one task = one client). With as many
    clients as tasks, client ``k`` holds the ``k``-th task in sorted name order. With
    fewer clients, the task names are shuffled with the seed and dealt round robin, so
    every client holds whole tasks and the task counts differ by at most one. With more
    clients than tasks, every task is cut into shards and every client holds one shard,
    i.e. examples of exactly one task: each task first gets one shard, the remaining
    shards go one at a time to the task with the most examples per shard (ties by name),
    and a task's seeded shuffle of examples is cut into near-equal contiguous pieces.
``dirichlet``
    Label-skew: every client ``k`` draws category (task) proportions ``q_k ~ Dir(alpha)``
    (symmetric, numpy ``default_rng(seed)``). Client sizes are near-equal (they differ by
    at most one). Examples are dealt slot by slot, round robin over the clients in a
    seeded order: each slot draws a task from the client's ``q_k`` restricted to the
    tasks that still have unassigned examples, and takes the next example of that task
    (tasks are shuffled with the seed). Small ``alpha`` gives clients dominated by a few
    tasks; large ``alpha`` approaches iid.
``iid``
    A seeded shuffle of all examples, cut into near-equal contiguous pieces (sizes differ
    by at most one).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flexlora.data._util import atomic_write_text, derive_seed
from flexlora.data.errors import DataError
from flexlora.data.examples import Example, TaskData

__all__ = ["PARTITION_METHODS", "Partition", "partition_examples"]

PARTITION_METHODS = ("natural", "dirichlet", "iid")
_FORMAT = "flexlora-partition/1"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass
class Partition:
    """An assignment of example ids to clients.

    Parameters
    ----------
    clients : list of list of str
        ``clients[k]`` are the ids of client ``k``'s training examples.
    method : str
        ``"natural"``, ``"dirichlet"`` or ``"iid"`` (or anything a caller built by hand).
    seed : int
        Seed the partition was drawn with.
    params : dict
        Method parameters (``alpha``, ``min_per_client``, ...), JSON-serialisable.
    source : str, default ""
        ``TaskData.name`` of the data that was partitioned.
    """

    clients: list[list[str]]
    method: str
    seed: int
    params: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.clients)

    def num_examples(self, k: int) -> int:
        """Number of training examples of client ``k`` (its aggregation weight ``n_k``)."""
        return len(self.clients[k])

    def sizes(self) -> list[int]:
        """``num_examples(k)`` for every client."""
        return [len(c) for c in self.clients]

    def _payload(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seed": self.seed,
            "params": self.params,
            "source": self.source,
            "clients": self.clients,
        }

    def digest(self) -> str:
        """sha256 (hex) of the canonical JSON of method, seed, params, source and clients."""
        return hashlib.sha256(_canonical(self._payload()).encode("utf-8")).hexdigest()

    def manifest(self) -> dict[str, Any]:
        """A JSON-ready description of the partition, with its integrity hash.

        Returns
        -------
        dict
            ``format``, ``method``, ``seed``, ``params``, ``source``, ``num_clients``,
            ``sizes``, ``clients`` (``{"0": [ids...], "1": ...}``), ``hash`` (sha256 hex,
            see :meth:`digest`) and ``hash_algorithm`` (``"sha256"``).
        """
        return {
            "format": _FORMAT,
            "method": self.method,
            "seed": self.seed,
            "params": self.params,
            "source": self.source,
            "num_clients": self.num_clients,
            "sizes": self.sizes(),
            "clients": {str(k): ids for k, ids in enumerate(self.clients)},
            "hash_algorithm": "sha256",
            "hash": self.digest(),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`manifest` as JSON, atomically (temporary file + ``os.replace``)."""
        target = Path(path)
        atomic_write_text(target, json.dumps(self.manifest(), indent=1, ensure_ascii=False))
        return target

    @classmethod
    def from_manifest(
        cls, manifest: Any, *, path: str | os.PathLike[str] | None = None
    ) -> Partition:
        """Rebuild a partition from :meth:`manifest` output, verifying its hash.

        Raises
        ------
        DataError
            Wrong structure, duplicate ids, or a hash that does not match the content.
        """
        fix = "re-create the partition (partition_examples + save); do not edit manifests."
        if not isinstance(manifest, dict):
            raise DataError("a partition manifest must be a JSON object.", path=path, fix=fix)
        required = ("method", "seed", "params", "clients", "hash")
        missing = [k for k in required if k not in manifest]
        if missing:
            raise DataError(f"partition manifest lacks {missing}.", path=path, fix=fix)
        if manifest.get("format", _FORMAT) != _FORMAT:
            raise DataError(
                f"unknown partition format {manifest.get('format')!r}; expected {_FORMAT!r}.",
                path=path,
                fix=fix,
            )
        raw = manifest["clients"]
        if not isinstance(raw, dict) or sorted(raw, key=_int_or_inf) != [
            str(k) for k in range(len(raw))
        ]:
            raise DataError(
                "'clients' must map '0', '1', ... to lists of example ids.", path=path, fix=fix
            )
        clients = [raw[str(k)] for k in range(len(raw))]
        if not all(isinstance(c, list) and all(isinstance(i, str) for i in c) for c in clients):
            raise DataError("every client must be a list of string ids.", path=path, fix=fix)
        part = cls(
            clients=clients,
            method=manifest["method"],
            seed=manifest["seed"],
            params=manifest["params"],
            source=manifest.get("source", ""),
        )
        algorithm = manifest.get("hash_algorithm", "sha256")
        if algorithm != "sha256" or part.digest() != manifest["hash"]:
            raise DataError(
                "partition manifest hash mismatch: the file was modified or corrupted.",
                path=path,
                fix=fix,
            )
        ids = [i for c in clients for i in c]
        if len(ids) != len(set(ids)):
            raise DataError(
                "an example id is assigned to more than one client.", path=path, fix=fix
            )
        return part

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Partition:
        """Read a partition saved by :meth:`save`, verifying its hash.

        Raises
        ------
        DataError
            Missing file, invalid JSON, wrong structure, or a hash mismatch.
        """
        p = Path(path)
        if not p.is_file():
            raise DataError("partition manifest does not exist.", path=p)
        try:
            manifest = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            line = getattr(exc, "lineno", None)
            raise DataError(
                f"partition manifest is not valid JSON ({exc}).",
                path=p,
                line=line,
                fix="re-create the partition; the file is corrupted.",
            ) from exc
        return cls.from_manifest(manifest, path=p)

    # -- resolving ids against the data -------------------------------------------------

    def client_examples(self, data: TaskData, k: int) -> list[Example]:
        """The :class:`Example` objects of client ``k``, in partition order.

        Raises
        ------
        DataError
            If an id of the client is not a training example of ``data``.
        """
        lookup = {ex.id: ex for ex in data.iter_train()}
        return self._resolve(lookup, k, data)

    def all_client_examples(self, data: TaskData) -> list[list[Example]]:
        """``client_examples(data, k)`` for every client, in one pass over the data."""
        lookup = {ex.id: ex for ex in data.iter_train()}
        return [self._resolve(lookup, k, data) for k in range(self.num_clients)]

    def _resolve(self, lookup: dict[str, Example], k: int, data: TaskData) -> list[Example]:
        try:
            return [lookup[i] for i in self.clients[k]]
        except KeyError as exc:
            raise DataError(
                f"client {k} holds example id {exc.args[0]!r}, which is not a training "
                f"example of {data.name!r} (partition made from {self.source!r}).",
                fix="partition this data set again, with the same loader options.",
            ) from None

    def verify(self, data: TaskData) -> None:
        """Check that the partition covers every training example of ``data`` exactly once.

        Raises
        ------
        DataError
            Naming a missing, unknown or repeated id.
        """
        want = [ex.id for ex in data.iter_train()]
        got = [i for c in self.clients for i in c]
        counts: dict[str, int] = {}
        for i in got:
            counts[i] = counts.get(i, 0) + 1
        repeated = [i for i, n in counts.items() if n > 1]
        unknown = sorted(set(counts) - set(want))
        missing = [i for i in want if i not in counts]
        for problem, ids in (("repeated", repeated), ("unknown", unknown), ("unassigned", missing)):
            if ids:
                raise DataError(
                    f"partition does not match {data.name!r}: {len(ids)} {problem} example "
                    f"id(s), e.g. {ids[:3]}.",
                    fix="partition this data set again, with the same loader options.",
                )

    def task_counts(self, data: TaskData) -> list[dict[str, int]]:
        """Per client, the number of examples of each task (for logs and skew metrics)."""
        out = []
        for examples in self.all_client_examples(data):
            counts: dict[str, int] = {}
            for ex in examples:
                counts[ex.task] = counts.get(ex.task, 0) + 1
            out.append(counts)
        return out


def _int_or_inf(key: str) -> float:
    return int(key) if key.isdigit() else float("inf")


def _even_split(items: list[str], parts: int) -> list[list[str]]:
    """Contiguous pieces whose sizes differ by at most one, larger pieces first."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        size = q + (1 if k < r else 0)
        out.append(items[start : start + size])
        start += size
    return out


def _shuffled(items: list[str], *parts: object) -> list[str]:
    out = list(items)
    random.Random(derive_seed(*parts)).shuffle(out)
    return out


def _natural(groups: dict[str, list[str]], num_clients: int, seed: int) -> list[list[str]]:
    tasks = sorted(groups)
    if num_clients == len(tasks):
        return [list(groups[t]) for t in tasks]
    if num_clients < len(tasks):
        order = _shuffled(tasks, "natural-tasks", seed)
        clients: list[list[str]] = [[] for _ in range(num_clients)]
        for i, task in enumerate(order):
            clients[i % num_clients].extend(groups[task])
        return clients
    # More clients than tasks: shards. Highest-averages allocation (as in seat
    # apportionment) gives each task shards in proportion to its size, never more shards
    # than examples.
    shards = {t: 1 for t in tasks}
    heap = [(-len(groups[t]) / 2, t) for t in tasks if len(groups[t]) > 1]
    heapq.heapify(heap)
    for _ in range(num_clients - len(tasks)):
        _, task = heapq.heappop(heap)
        shards[task] += 1
        if shards[task] < len(groups[task]):
            heapq.heappush(heap, (-len(groups[task]) / (shards[task] + 1), task))
    clients = []
    for task in tasks:
        pool = _shuffled(groups[task], "natural-shard", seed, task)
        clients.extend(_even_split(pool, shards[task]))
    return clients


def _dirichlet(
    groups: dict[str, list[str]], num_clients: int, alpha: float, seed: int
) -> list[list[str]]:
    tasks = sorted(groups)
    rng = np.random.default_rng(seed)
    props = rng.dirichlet(np.full(len(tasks), alpha), size=num_clients)
    # Tiny alpha can underflow proportions to exactly 0.0 (intended: the client then only
    # wants its few tasks); a NaN row would poison the sampling, so it is zeroed, which
    # sends that client to the fallback below.
    props = np.nan_to_num(props, nan=0.0)
    pools = [_shuffled(groups[t], "dirichlet-pool", seed, t) for t in tasks]
    next_index = [0] * len(tasks)
    total = sum(len(p) for p in pools)
    sizes = [len(c) for c in _even_split([""] * total, num_clients)]
    order = [int(k) for k in rng.permutation(num_clients)]
    uniforms = iter(rng.random(total).tolist())
    prop_rows = props.tolist()
    clients: list[list[str]] = [[] for _ in range(num_clients)]
    for round_ in itertools.count():
        active = [k for k in order if sizes[k] > round_]
        if not active:
            break
        for k in active:
            weights = [
                p if next_index[c] < len(pools[c]) else 0.0 for c, p in enumerate(prop_rows[k])
            ]
            cumulative = list(itertools.accumulate(weights))
            if cumulative[-1] <= 0.0:
                # The client's own tasks are used up: fall back to the remaining tasks in
                # proportion to what is left, which keeps the assignment complete.
                weights = [float(len(p) - i) for p, i in zip(pools, next_index)]
                cumulative = list(itertools.accumulate(weights))
            u = next(uniforms) * cumulative[-1]
            c = bisect.bisect_right(cumulative, u)
            if c >= len(tasks) or weights[c] <= 0.0:
                # u rounded up onto the total: take the last task that has weight.
                c = max(i for i, w in enumerate(weights) if w > 0.0)
            clients[k].append(pools[c][next_index[c]])
            next_index[c] += 1
    return clients


def partition_examples(
    data: TaskData,
    num_clients: int,
    method: str = "natural",
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_per_client: int = 1,
) -> Partition:
    """Partition the training examples of ``data`` over ``num_clients`` clients.

    Parameters
    ----------
    data : TaskData
        Its ``train`` examples are partitioned; ``unseen`` is left alone.
    num_clients : int
        Number of clients, at least 1 and at most the number of training examples.
    method : {"natural", "dirichlet", "iid"}, default "natural"
        See the module documentation.
    alpha : float, default 0.5
        Dirichlet concentration (``dirichlet`` only); must be positive.
    seed : int, default 0
        Seed of every random choice.
    min_per_client : int, default 1
        Every client must receive at least this many examples.

    Returns
    -------
    Partition

    Raises
    ------
    DataError
        ``num_clients < 1``, more clients than examples (or than ``min_per_client`` allows),
        unknown method, ``alpha <= 0``, or a ``natural`` partition that leaves a client
        below ``min_per_client``.
    """
    if method not in PARTITION_METHODS:
        raise DataError(
            f"unknown partition method {method!r}.", fix=f"use one of {list(PARTITION_METHODS)}."
        )
    if not isinstance(num_clients, int) or num_clients < 1:
        raise DataError(f"num_clients must be a positive integer, got {num_clients!r}.")
    if min_per_client < 1:
        raise DataError(f"min_per_client must be >= 1, got {min_per_client}.")
    if method == "dirichlet" and not (alpha > 0 and np.isfinite(alpha)):
        raise DataError(f"alpha must be a positive finite number, got {alpha!r}.")
    n = data.num_train
    if num_clients * min_per_client > n:
        raise DataError(
            (f"{num_clients} clients x min_per_client={min_per_client} need " if min_per_client > 1
             else f"{num_clients} clients need one example each, ")
            + f"{num_clients * min_per_client} examples, but {data.name!r} has {n} training examples.",
            fix="use fewer clients (in a run config: --set num_clients=N, or 0 for one per task)"
            + (", a smaller min_per_client" if min_per_client > 1 else "")
            + ", or more data (in a run config: --set data_options.max_per_task=0 keeps every example).",
        )
    groups = {t: [ex.id for ex in exs] for t, exs in data.train.items() if exs}
    params: dict[str, Any] = {"num_clients": num_clients, "min_per_client": min_per_client}
    if method == "natural":
        clients = _natural(groups, num_clients, seed)
    elif method == "dirichlet":
        params["alpha"] = float(alpha)
        clients = _dirichlet(groups, num_clients, float(alpha), seed)
    else:
        all_ids = [i for ids in groups.values() for i in ids]
        clients = _even_split(_shuffled(all_ids, "iid", seed), num_clients)
    small = [k for k, c in enumerate(clients) if len(c) < min_per_client]
    if small:
        raise DataError(
            f"natural partition leaves client(s) {small[:5]} with fewer than "
            f"min_per_client={min_per_client} examples (their task is too small).",
            fix="use fewer clients, min_per_client=1, or method='iid'/'dirichlet'.",
        )
    return Partition(clients=clients, method=method, seed=seed, params=params, source=data.name)

