"""One round's replies: checked against their tasks, folded as they arrive, turned into the
round's record.

An engine yields one :class:`ClientOutcome` per task; :class:`RoundFold` asks the run's method
to read the reply (:meth:`flexlora.methods.Method.read_reply`), checks the example count against
the client's partition, and folds a valid update into the method's fold at once; a bad or missing
reply is dropped by name. :meth:`RoundFold.finish` enforces ``min_clients`` and lets the method
install the new global state, which is never installed when it is not finite.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from flexlora.core.types import AggregationError
from flexlora.methods import ClientReply, ReplyError, rank_summary
from flexlora.training.client import ClientTask

if TYPE_CHECKING:
    from flexlora.engines.federation import Federation

TIME_KEYS = ("seconds", "eval_seconds", "aggregate_seconds")


class FederationError(RuntimeError):
    """A round cannot go on (too few valid client replies, no nodes); the last checkpoint is intact."""


@dataclass
class ClientOutcome:
    """What came back for one :class:`ClientTask`: a reply, or the reason there is none.

    ``bytes_up``/``bytes_down`` are the payload bytes that crossed (or, in process, would cross)
    the wire; ``where`` names the node for logs (``None`` in process). ``own_data`` is set for a
    node that trains on its own data set rather than partition ``task.client`` of the run's data:
    only then is the reply's example count (its aggregation weight) taken on trust.
    """

    task: ClientTask
    reply: ClientReply | None = None
    failure: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    where: str | None = None
    own_data: bool = False

    def __post_init__(self) -> None:
        self.train_loss = self.reply.train_loss if self.reply is not None else math.nan
        self.steps = self.reply.steps if self.reply is not None else 0


class Engine(Protocol):
    """Moves one round's tasks to the clients and their replies back."""

    def train_round(self, fed: Federation, rnd: int, tasks: Sequence[ClientTask]) -> Iterable[ClientOutcome]:
        """One outcome per task, yielded as each arrives (the federation folds it in at once, so an
        engine that yields instead of collecting never holds the round's updates together)."""
        ...


@dataclass
class RunResult:
    """What :meth:`Federation.run` returns."""

    run_dir: Path
    records: list[dict[str, Any]]
    summary: str


class RoundFold:
    """One round's replies, folded into the method's aggregate as they arrive (from
    :meth:`Federation.begin_aggregation`)."""

    def __init__(self, fed: Federation, rnd: int, tasks: Sequence[ClientTask]) -> None:
        self.fed = fed
        self.rnd = rnd
        self.outcomes: list[ClientOutcome] = []
        self.valid: list[tuple[ClientOutcome, int]] = []  # (outcome, its number of examples)
        self.dropped: list[dict[str, str]] = []
        self.seconds = 0.0
        self._position = {id(t): i for i, t in enumerate(tasks)}
        self.fold = fed.method.begin_fold(rnd, tasks)

    def add(self, o: ClientOutcome) -> None:
        """Check ``o`` and fold its update in (or record why it is dropped)."""
        fed = self.fed
        self.outcomes.append(o)
        reason = o.failure
        if reason is None and o.reply is None:
            reason = "no reply"
        update = None
        if reason is None:
            assert o.reply is not None
            try:
                update = fed.method.read_reply(o.task, o.reply)
            except ReplyError as exc:
                reason = str(exc)
        if reason is None and not o.own_data:
            reason = fed.check_count(o.task, o.reply.num_examples)  # type: ignore[union-attr]
        if reason is None:
            t0 = time.perf_counter()
            try:
                self.fold.add(o.task, update)
            except AggregationError as exc:
                reason = str(exc)
            self.seconds += time.perf_counter() - t0
        if reason is not None:
            where = f" on {o.where}" if o.where else ""
            fed.log(f"warning: round {self.rnd}: {o.task.spec.client_id}{where} dropped from this round: {reason}")
            self.dropped.append({"client": o.task.spec.client_id, "where": o.where or "", "reason": reason})
            return
        assert o.reply is not None
        self.valid.append((o, int(o.reply.num_examples)))
        o.train_loss, o.steps = o.reply.train_loss, o.reply.steps
        o.reply = None  # folded: the payload is not kept here

    def finish(self) -> dict[str, Any]:
        """Install the round's global state and return its record.

        Raises
        ------
        FederationError
            When fewer than ``min_clients`` valid updates arrived, or the aggregate is not finite;
            the state is left as it was.
        """
        fed, rnd = self.fed, self.rnd
        # The record lists the clients in the tasks' order, whatever order their replies came in.
        pos = lambda o: self._position.get(id(o.task), len(self._position))  # noqa: E731
        outcomes = sorted(self.outcomes, key=pos)
        self.valid.sort(key=lambda v: pos(v[0]))
        need = max(1, fed.cfg.min_clients)
        if len(self.valid) < need:
            raise FederationError(
                f"round {rnd}: {len(self.valid)} of {len(outcomes)} sampled clients returned a valid update, fewer "
                f"than min_clients = {need} ({'; '.join(d['client'] + ': ' + d['reason'] for d in self.dropped)[:600]}). "
                f"The checkpoint of round {rnd - 1} in {fed.run_dir} is intact: bring the nodes back (or lower "
                f"min_clients with --set min_clients=N) and continue with --resume {fed.run_dir}"
            )
        t0 = time.perf_counter()
        extras = self.fold.finish(self._check_finite)
        agg_seconds = self.seconds + (time.perf_counter() - t0)
        group_losses: dict[str, list[float]] = {}
        for o, _ in self.valid:
            group_losses.setdefault(o.task.spec.type_name, []).append(o.train_loss)
        record: dict[str, Any] = {
            "round": rnd,
            "clients": [o.task.spec.client_id for o in outcomes],
            "train_loss": float(np.average([o.train_loss for o, _ in self.valid], weights=[n for _, n in self.valid])),
            "groups": {g: {"clients": len(v), "train_loss": float(np.mean(v))} for g, v in sorted(group_losses.items())},
            "bytes_up": int(sum(o.bytes_up for o in outcomes)),
            "bytes_down": int(sum(o.bytes_down for o in outcomes)),
            "bytes": {o.task.spec.client_id: {"type": o.task.spec.type_name, "up": int(o.bytes_up),
                                              "down": int(o.bytes_down)} for o in outcomes},
            "aggregate_seconds": agg_seconds,
        }
        if fed.state is not None:
            record["spectrum"] = fed.spectrum()
            record["tail_energy"] = fed.tail_energy()
        pruned = extras.pop("pruned", None)
        record.update(extras)
        record["ranks"] = {o.task.spec.client_id: rank_summary(o.task.spec.ranks, fed.groups) for o in outcomes}
        if pruned:
            record["pruned"] = pruned
        if self.dropped:
            record["dropped"] = self.dropped
        return record

    def _check_finite(self, bad: list[str]) -> None:
        # Every update was checked on arrival; this is the last guard before the new state is
        # installed and checkpointed over the previous round's.
        if bad:
            fed, rnd = self.fed, self.rnd
            raise FederationError(
                f"round {rnd}: the aggregated global update is not finite in {len(bad)} module(s) "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); it was not installed. The checkpoint "
                f"of round {rnd - 1} in {fed.run_dir} is intact: continue with --resume {fed.run_dir} "
                "(lower train.lr if the clients' training diverges)"
            )


def spectrum(state: Any, shapes: dict[str, tuple[int, int]], used: Sequence[dict[str, int]], top: int = 8
             ) -> dict[str, Any]:
    """Leading singular values of the first adapted module's global update, and the first one
    beyond each client rank of that module (``beyond_ranks``: direction ``r + 1``, which the
    clients of rank ``r`` are not sent), to watch the rank collapse of the tail directions
    across rounds (method.md, section 2)."""
    m = next(iter(shapes))
    st = state.modules[m]
    s = st.svd.S if st.svd is not None else st.to_svd().S
    ranks = sorted({r[m] for r in used})
    return {"module": m, "top": [float(x) for x in s[:top]], "rank_held": int(s.shape[0]),
            "beyond_ranks": {str(r): float(s[r]) for r in ranks if r < s.shape[0]}}


def tail_energy(state: Any, shapes: dict[str, tuple[int, int]], used: Sequence[dict[str, int]]) -> float:
    """Share of the global update's energy beyond the smallest client rank, over every module:
    ``sum_m sum_{i > r_min(m)} s_i^2 / sum_m sum_i s_i^2`` (the "rank collapse" measure)."""
    tail = total = 0.0
    for m in shapes:
        st = state.modules[m]
        s2 = (st.svd.S if st.svd is not None else st.to_svd().S).double() ** 2
        r_min = min(r[m] for r in used)
        tail += float(s2[r_min:].sum())
        total += float(s2.sum())
    return tail / total if total > 0 else 0.0


def deterministic_view(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics without wall-clock fields (what must match bit for bit across a resume or engines)."""
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]
