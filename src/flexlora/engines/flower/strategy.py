"""FlexLoRAStrategy: the server side of the Flower engine.

The strategy owns what Flower's own strategies own (a round's messages, the replies) and nothing
more: the round's plan, the validation of replies, the aggregation by the run's method (any of
:mod:`flexlora.methods`), the evaluation, the checkpoints and the run directory all belong to the
shared :class:`~flexlora.engines.federation.Federation`, exactly as in the in-process engine. The
federation's round loop drives the rounds (:class:`FlowerEngine`); Flower's batch entry points
``configure_train``/``aggregate_train`` are not used.

What only a network federation needs is here:

- *capabilities*: the server cannot read a node's ``node_config``, so it asks every node
  (``query.capabilities``) which partition it holds and what it can afford (a client type,
  explicit ranks, or a budget mapped to ranks with :func:`flexlora.core.distributions.types_from_budget`);
- *one message per node*, carrying that node's own factors at its own per-module ranks;
- *failures*: a node that crashed, timed out, answered with an error or with a malformed
  message is dropped from the round with a logged warning; the federation then enforces
  ``min_clients``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from flexlora.core.distributions import ClientType, types_from_budget
from flexlora.engines import faults
from flexlora.engines.config import ConfigError, to_toml
from flexlora.engines.federation import Federation
from flexlora.engines.flower.wire import (
    MSG_CAPABILITIES,
    MSG_TRAIN,
    WireError,
    decode_reply,
    record_nbytes,
    task_content,
    whole_number,
)
from flexlora.engines.rounds import ClientOutcome, FederationError, RunResult
from flexlora.engines.run_setup import client_types_for
from flexlora.training.client import ClientTask

POLL_SECONDS = 0.5
"""Pause between two pulls of a round's replies when none came (Flower's own send_and_receive waits 3 s)."""


class FlexLoRAStrategy(Strategy):
    """Drive a :class:`~flexlora.engines.federation.Federation` over a Flower Grid.

    Parameters
    ----------
    federation : Federation
        The run (its config, data plan, aggregator, outputs). Its ``cfg.flower`` section gives the
        defaults of the settings below.
    round_timeout : float, optional
        Seconds to wait for a round's replies (default ``cfg.flower.round_timeout``).
    wire_dtype : {"float32", "float16"}, optional
        Dtype of the factors on the wire (default ``cfg.flower.wire_dtype``).
    wait_for_nodes : float, optional
        Seconds to wait at start for a node of every client (default ``cfg.flower.wait_for_nodes``).
    log : callable, optional
        Where status lines and warnings go (default: the federation's).
    """

    def __init__(
        self,
        federation: Federation,
        *,
        round_timeout: float | None = None,
        wire_dtype: str | None = None,
        wait_for_nodes: float | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        fl = federation.cfg.flower
        self.fed = federation
        self.round_timeout = float(round_timeout if round_timeout is not None else fl.round_timeout)
        self.wire_dtype = wire_dtype or fl.wire_dtype
        self.wait_for_nodes = float(wait_for_nodes if wait_for_nodes is not None else fl.wait_for_nodes)
        self.fold_order = fl.fold_order
        self._tasks: list[ClientTask] = []
        self._node_of_task: dict[int, int] = {}  # id(task) -> node id it was sent to, this round
        self.log = log or federation.log
        self.node_of: dict[int, int] = {}  # client index -> node id
        self._own_data: set[int] = set()  # clients whose node trains on its own data set
        self._seen: set[int] = set()  # node ids already asked for their capabilities
        self._started = False
        self._run_config = to_toml(federation.cfg)
        self._sent: dict[int, ClientTask] = {}  # node id -> the task sent to it this round
        self._down: dict[int, int] = {}
        self._msgs: dict[int, Message] = {}  # node id -> the train message sent to it this round
        self._node_of_msg: dict[str, int] | None = None  # message id -> node id, this round
        self._method = federation.method.name

    # ------------------------------------------------------------ capabilities
    def _resolve(self, node: int, caps: ConfigRecord) -> tuple[int, ClientType | None]:
        fed = self.fed
        try:
            k = whole_number(caps["partition-id"])
        except (KeyError, TypeError, ValueError) as exc:
            raise WireError(f"capabilities without a whole-number partition-id: {dict(caps)!r}") from exc
        if not 0 <= k < fed.num_clients:
            raise WireError(f"partition-id {k} is outside the run's clients 0..{fed.num_clients - 1}")
        types = client_types_for(fed.cfg)
        if "client-type" in caps:
            name = str(caps["client-type"])
            match = [t for t in types if t.name == name]
            if not match:
                raise WireError(f"client-type {name!r} is not one of the run's types {[t.name for t in types]}")
            return k, match[0]
        if "ranks" in caps:
            try:
                parts = [int(x) for x in str(caps["ranks"]).split(",")]
                att, mlp = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
                if len(parts) > 2:
                    raise ValueError
                return k, ClientType(f"r{att}-{mlp}", att, mlp, fed.cfg.lora.alpha)
            except ValueError as exc:
                raise WireError(f"ranks {caps['ranks']!r} must be 'r' or 'attention,mlp' positive ints") from exc
        if "budget" in caps:
            unit = str(caps.get("budget-unit", "params"))
            raw = caps["budget"]
            if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw) or raw <= 0:
                raise WireError(f"budget {raw!r} must be a positive number (of {unit})")
            try:
                t = types_from_budget([float(raw)], fed.shapes, types=types, unit=unit, groups=fed.groups)[0]
            except ValueError as exc:
                # types_from_budget numbers its budgets from 0; this node's one is partition k's.
                raise WireError(f"partition {k}: {str(exc).removeprefix('client 0: ')}") from exc
            return k, t
        return k, None

    def discover(self, grid: Grid, wait: float = 0.0) -> None:
        """Ask every node not yet known for its capabilities; wait up to ``wait`` seconds for a node
        of every client. Types declared after the run started are not applied (the rank
        assignment of a run is fixed); such a node serves its partition at the assigned type."""
        deadline = time.monotonic() + wait
        while True:
            new = [n for n in grid.get_node_ids() if n not in self._seen]
            if new:
                self._query(grid, new)
            if len(self.node_of) >= self.fed.num_clients or time.monotonic() >= deadline:
                break
            time.sleep(0.5)

    def _query(self, grid: Grid, nodes: Sequence[int]) -> None:
        msgs = [Message(RecordDict(), dst_node_id=n, message_type=MSG_CAPABILITIES, ttl=max(60.0, self.round_timeout))
                for n in nodes]
        # Generous: a Ray simulation's workers or a node's first import can take a while to start.
        replies = list(grid.send_and_receive(msgs, timeout=min(300.0, self.round_timeout)))
        node_of_msg = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        answered = set()
        for rep in replies:
            node = node_of_msg.get(rep.metadata.reply_to_message_id, rep.metadata.src_node_id)
            answered.add(node)
            self._seen.add(node)
            try:
                if rep.has_error():
                    raise WireError(f"error reply: {rep.error.reason}")
                caps = rep.content.config_records.get("capabilities")
                if caps is None:
                    raise WireError("reply without a 'capabilities' ConfigRecord")
                k, ctype = self._resolve(node, caps)
            except WireError as exc:
                self.log(f"warning: node {node} ignored: {exc}")
                continue
            old = self.node_of.get(k)
            if old is not None and old in set(grid.get_node_ids()):
                self.log(f"warning: node {node} claims partition {k}, already held by node {old}; ignored")
                continue
            if ctype is not None and not self._started:
                try:
                    self.fed.set_client_type(k, ctype)
                except ConfigError as exc:
                    self.log(f"warning: node {node} ignored: its type {ctype.name} does not fit the run: {exc}")
                    continue
            self.node_of[k] = node
            if caps.get("own-data") is True:
                self._own_data.add(k)
            else:
                self._own_data.discard(k)
            if ctype is not None and self._started and self.fed.types[self.fed.client_type[k]] != ctype:
                self.log(f"warning: node {node} declares {ctype.name} for client {k}, but the run assigned "
                         f"{self.fed.types[self.fed.client_type[k]].name}; the run's assignment is kept")
            data = ", its own data: its example count is taken on trust" if k in self._own_data else ""
            self.log(f"node {node}: client {k} ({self.fed.client_spec(k).type_name}{data})")
        for n in set(nodes) - answered:
            self.log(f"warning: node {n} did not answer the capability query; it is asked again next round")

    # ------------------------------------------------------------- Strategy
    def messages_for(self, server_round: int, tasks: Sequence[ClientTask], grid: Grid) -> list[Message]:
        """One ``train`` Message per task whose client has a node."""
        msgs, self._sent, self._down, self._msgs = [], {}, {}, {}
        self._node_of_msg = None  # built at the first reply, once the push has given the messages ids
        self._tasks = list(tasks)
        self._node_of_task: dict[int, int] = {}
        for t in tasks:
            node = self.node_of.get(t.client)
            if node is None:
                continue
            content = task_content(t, self._method, self._run_config, self.wire_dtype)
            self._down[node] = record_nbytes(content.array_records.get("tensors"))
            self._sent[node] = t
            self._node_of_task[id(t)] = node
            msg = Message(content, dst_node_id=node, message_type=MSG_TRAIN, ttl=self.round_timeout,
                          group_id=str(server_round))
            self._msgs[node] = msg
            msgs.append(msg)
        return msgs

    def outcome_of(self, server_round: int, rep: Message, got: Mapping[int, Any] = {}) -> ClientOutcome | None:
        """The outcome a reply carries, or None (with a warning) for a reply to no message of this
        round's or a second reply from the same node (in ``got``)."""
        # Match by the message a reply answers, not by its sender: when a node dies, the SuperLink
        # itself answers for it (an error reply from the SuperLink's own node id).
        if self._node_of_msg is None:  # message ids exist once the round's messages are pushed
            self._node_of_msg = {m.metadata.message_id: n for n, m in self._msgs.items() if m.metadata.message_id}
        node = self._node_of_msg.get(rep.metadata.reply_to_message_id, rep.metadata.src_node_id)
        task = self._sent.get(node)
        if task is None or node in got:
            self.log(f"warning: round {server_round}: reply from node {rep.metadata.src_node_id} to no message "
                     "of this round's; ignored")
            return None
        where, down, own = f"node {node}", self._down.get(node, 0), task.client in self._own_data
        try:
            if rep.has_error():
                raise WireError(self._error_reason(rep))
            reply, up = decode_reply(rep.content)
        except WireError as exc:
            return ClientOutcome(task, failure=str(exc), where=where, bytes_down=down, own_data=own)
        return ClientOutcome(task, reply, bytes_up=up, bytes_down=down, where=where, own_data=own)

    def missing_outcome(self, task: ClientTask) -> ClientOutcome:
        """The outcome of a task whose reply never came (or whose client has no node)."""
        node = self._node_of_task.get(id(task))
        if node is None:
            return ClientOutcome(task, failure=f"no connected node holds partition {task.client}")
        return ClientOutcome(task, failure=f"no reply within {self.round_timeout:g}s (crashed, disconnected or too "
                             "slow)", where=f"node {node}", bytes_down=self._down.get(node, 0))

    def _error_reason(self, rep: Message) -> str:
        """What an error reply means for the round, in words; the SuperLink answers for a node
        whose message expired (it timed out) or that stopped sending heartbeats (it died)."""
        code, reason = rep.error.code, rep.error.reason
        if code in (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
            return (f"no reply within {self.round_timeout:g}s (crashed, disconnected or too slow); "
                    f"the SuperLink says: {reason}")
        if code == ErrorCode.NODE_UNAVAILABLE:
            return f"the node is unavailable (crashed or disconnected); the SuperLink says: {reason}"
        return f"the node failed: {reason}"

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        """Not used: the federation's round loop sends the rounds' messages (:class:`FlowerEngine`)."""
        raise NotImplementedError("FlexLoRAStrategy runs its rounds through start(); configure_train is not used")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Not used: replies are folded as they arrive (:class:`FlowerEngine`)."""
        raise NotImplementedError("FlexLoRAStrategy runs its rounds through start(); aggregate_train is not used")

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        """No client-side evaluation: the global model is evaluated on the server's unseen tasks."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        fed = self.fed
        self.log(f"FlexLoRAStrategy: {fed.method.summary()}, {fed.num_clients} clients, "
                 f"{fed.cfg.clients_per_round:g} per round, {fed.cfg.rounds} rounds, min_clients {fed.cfg.min_clients}, "
                 f"round_timeout {self.round_timeout:g}s, wire {self.wire_dtype}, run dir {fed.run_dir}")

    def start(self, grid: Grid, *args: Any, **kwargs: Any) -> RunResult:  # type: ignore[override]
        """Run the federation over ``grid`` (the arguments of ``Strategy.start`` are taken from the
        run config instead: rounds, timeouts and evaluation are the federation's)."""
        self.summary()
        self.discover(grid, self.wait_for_nodes)
        if len(self.node_of) < self.fed.cfg.min_clients:
            raise FederationError(
                f"only {len(self.node_of)} node(s) answered within {self.wait_for_nodes:g}s, fewer than min_clients = "
                f"{self.fed.cfg.min_clients}; start more SuperNodes (each with --node-config \"partition-id=K\")"
            )
        missing = [k for k in range(self.fed.num_clients) if k not in self.node_of]
        if missing:
            self.log(f"warning: no node holds clients {missing[:10]}{'...' if len(missing) > 10 else ''}; "
                     "they are dropped from the rounds that sample them")
        self._started = True
        return self.fed.run(FlowerEngine(self, grid))


class FlowerEngine:
    """The Engine of :meth:`Federation.run` on Flower: send the round's messages, collect the replies."""

    def __init__(self, strategy: FlexLoRAStrategy, grid: Grid) -> None:
        self.strategy = strategy
        self.grid = grid

    def train_round(self, fed: Federation, rnd: int, tasks: Sequence[ClientTask]) -> Iterator[ClientOutcome]:
        """Send the round's messages and yield each reply's outcome as it is pulled, for the
        federation to fold in at once (streaming aggregation).

        With ``flower.fold_order = "task"`` (the default) a reply that arrives before the reply of
        an earlier task waits for it, so the updates are folded in the tasks' order and the run's
        numbers equal the in-process engine's bit for bit; ``"arrival"`` folds every reply as it
        comes, so the server holds at most one update at a time, and the result equals the
        task-order one to float32 accuracy.
        """
        s = self.strategy
        s.discover(self.grid)
        msgs = s.messages_for(rnd, tasks, self.grid)
        pending = set(self.grid.push_messages(msgs)) if msgs else set()
        deadline = time.monotonic() + s.round_timeout
        arrival = s.fold_order == "arrival"
        order = list(tasks)
        ready: dict[int, ClientOutcome] = {}  # id(task) -> outcome waiting for its turn
        by_node: dict[int, ClientOutcome] = {}
        nxt = 0

        def flush(final: bool) -> Iterator[ClientOutcome]:
            nonlocal nxt
            while nxt < len(order):
                t = order[nxt]
                o = ready.pop(id(t), None)
                if o is None and (final or id(t) not in s._node_of_task):
                    o = s.missing_outcome(t)  # no node holds it, or its reply never came
                if o is None:
                    return
                nxt += 1
                yield o

        while pending:
            replies = list(self.grid.pull_messages(pending))
            for rep in replies:
                pending.discard(rep.metadata.reply_to_message_id)
                o = s.outcome_of(rnd, rep, by_node)
                if o is None:
                    continue
                by_node[s._node_of_task[id(o.task)]] = o
                if arrival:
                    yield o
                else:
                    ready[id(o.task)] = o
            del replies
            if not arrival:
                yield from flush(final=False)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        faults.fire("server.replies_in", rnd=rnd)
        if arrival:
            for t in order:
                node = s._node_of_task.get(id(t))
                if node is None or node not in by_node:
                    yield s.missing_outcome(t)
        else:
            yield from flush(final=True)
