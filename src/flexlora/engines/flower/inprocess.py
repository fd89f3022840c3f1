"""A Flower Grid that delivers messages to ClientApps in this process.

The same ServerApp code (:func:`~flexlora.engines.flower.server_app.run_server`) and the same
ClientApp run unchanged, with one Flower ``Context`` per virtual node: no Ray, no SuperLink, no
sockets. Messages still go through Flower's ``Message``/``RecordDict`` types and the FlexLoRA wire
format (arrays are serialised and read back). Used by the fast parity and failure tests, and handy
to debug a node configuration before a deployment.

Building Messages outside Flower's runtimes needs ``flwr.supercore.task_identity.TaskIdentity``
set; it is an internal API, which is one reason flwr is pinned (pyproject.toml) and this module
is covered by tests.
"""

from __future__ import annotations

import itertools
import traceback
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1


class InProcessGrid(Grid):
    """Virtual nodes in this process, each with its own ``node_config``.

    Parameters
    ----------
    client_app : ClientApp
    node_configs : sequence of mapping
        One node config per virtual node (e.g. ``{"partition-id": 0, "client-type": "type2"}``).
    run_config : mapping, optional
        The run config every node's Context sees.
    run_id : int, default 1

    Attributes
    ----------
    silent : dict node id -> round
        Test hook: from that round on the node sends no reply (a crash, or a timeout).
    offline : set of node ids
        Nodes that ``get_node_ids`` no longer lists.
    unavailable : dict node id -> round
        Test hook: from that round on, messages to the node are answered by the SuperLink (node
        id 1) with ``NODE_UNAVAILABLE``, as a real SuperLink does for a node that died.
    """

    def __init__(self, client_app: ClientApp, node_configs: Sequence[Mapping[str, Any]],
                 run_config: Mapping[str, Any] | None = None, *, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run_id = run_id
        self.contexts = {
            100 + i: Context(run_id=run_id, node_id=100 + i, node_config=dict(nc), state=RecordDict(),
                             run_config=dict(run_config or {}))
            for i, nc in enumerate(node_configs)
        }
        self.silent: dict[int, int] = {}
        self.offline: set[int] = set()
        self.unavailable: dict[int, int] = {}
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}
        self.messages_sent = 0
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID
        TaskIdentity.task_id = 0

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return getattr(self, "_run", None)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.contexts if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            node = msg.metadata.dst_node_id
            self.messages_sent += 1
            ids.append(mid)
            group = msg.metadata.group_id
            if node not in self.contexts or node in self.offline:
                continue
            rnd = int(group) if group.isdigit() else 0
            if node in self.silent and rnd >= self.silent[node]:
                continue
            if node in self.unavailable and rnd >= self.unavailable[node]:
                reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, "the node is offline"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = SERVER_NODE_ID
                self._replies[mid] = reply
                continue
            try:
                # Arrays are already serialised (numpy .npy bytes inside each Array), so the node
                # decodes exactly what a network peer would.
                reply = self.client_app(msg, self.contexts[node])
            except Exception as exc:  # what a SuperNode does when the ClientApp raises
                reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                      f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"), reply_to=msg)
            self._replies[mid] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))


def run_inprocess(cfg: Any, run_dir: Any, *, resume: bool = False, log: Any = print) -> Any:
    """Run ``cfg`` through the Flower ServerApp and ClientApps in this process, one virtual node
    per client (``flexlora run --engine flower-inprocess``)."""
    from flexlora.engines.federation import Federation
    from flexlora.engines.flower.client_app import app as client_app
    from flexlora.engines.flower.strategy import FlexLoRAStrategy

    fed = Federation(cfg, run_dir, resume=resume, progress=False, log=log)
    n = cfg.flower.num_supernodes or fed.num_clients
    grid = InProcessGrid(client_app, [{"partition-id": i, "num-partitions": n} for i in range(n)])
    return FlexLoRAStrategy(fed, log=log).start(grid)
