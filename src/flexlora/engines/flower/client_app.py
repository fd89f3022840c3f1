"""The FlexLoRA ClientApp: one client's round on a SuperNode.

``flwr run .`` finds it through ``[tool.flwr.app.components]`` in the project's pyproject.
It answers two messages: ``query.capabilities`` (which partition this node is, and what it can
afford) and ``train`` (train the server's task with the run's method, :func:`flexlora.engines.flower.node.train_task`,
and send its reply back). A task that fails raises, and Flower returns an error reply that the
server logs and drops from the round.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from flexlora.engines.flower.node import capabilities, train_task
from flexlora.engines.flower.wire import content_task, reply_content

app = ClientApp()


@app.query("capabilities")
def query_capabilities(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"capabilities": ConfigRecord(capabilities(context.node_config))}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    task, method, run_config_toml, wire_dtype = content_task(msg.content)
    reply = train_task(task, method, run_config_toml, context.node_config)
    return Message(reply_content(reply, wire_dtype), reply_to=msg)
