"""What a SuperNode knows and does: its capability, its data, and one client's round.

A node's identity comes from its ``node_config``:

- ``partition-id`` (int): which client of the run it is (its data partition, and the index the
  server samples). Flower's Ray simulation sets it for every virtual node; in deployment it is
  given with ``flower-supernode --node-config "partition-id=3"``.
- at most one capability: ``client-type`` (a type name of the run, e.g. ``"type2"``), ``ranks``
  (``"8"`` or ``"30,200"`` for attention,MLP) or ``budget`` (trainable LoRA parameters this node
  can afford; ``budget-unit="bytes"`` for memory). Without one, the node takes the type the run's
  ``rank_distribution`` drew for its partition, exactly as in the in-process engine.
- ``data`` (optional): a path to the node's own data set. Without it the node loads the run's
  ``data`` and keeps its own partition of it (the same deterministic partition as the server's).

The base model and the data are loaded once per process and reused across rounds and runs with
the same settings: they live in this module's state (``_MODELS``, ``_DATA``), which persists for
the life of the ClientApp's process. Module state rather than the ClientApp lifespan, because the
lifespan is entered around every single message. In Flower's Ray simulation the process (a Ray
actor) lives for the whole run, so the model is loaded once. A SuperNode in its default
``--isolation subprocess`` mode, however, starts a fresh ``flwr-clientapp`` process for every
message (measured: one per capability query and per round), so there the model is loaded again
each round. That is the runtime's design in flwr 1.42, not a setting: ``flwr-clientapp`` pulls one
task, runs it and exits (``flwr/supernode/runtime/run_clientapp.py``); ``--isolation process``
only moves the launching to an external ``flower-superexec``, whose subprocess executor again
starts one ``flwr-clientapp`` per task; and its warm executor pools serve only agent, model and
connector apps on Kubernetes. What each message pays is therefore kept small: the model comes
from flexlora's safetensors cache, and the cost left is importing torch and transformers.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from typing import Any

import torch

from flexlora.data import Example, load_task_data
from flexlora.engines import faults
from flexlora.engines.config import RunConfig, from_dict
from flexlora.engines.flower.wire import whole_number
from flexlora.engines.run_setup import (
    encoding_options,
    examples_by_id,
    load_run_data,
    load_run_model,
    local_train_config,
    partition_of,
    resolve_device,
)
from flexlora.methods import ClientContext, ClientReply, method_class
from flexlora.training.client import ClientTask

_MODELS: dict[tuple[str, str, str], tuple[torch.nn.Module, Any]] = {}
_DATA: dict[tuple[str, str, int, str], list[Example]] = {}
CAPABILITY_KEYS = ("client-type", "ranks", "budget")


class NodeError(ValueError):
    """A node's configuration cannot serve the run (bad node_config, wrong partition, no data)."""


def partition_id(node_config: Mapping[str, Any]) -> int:
    """The node's ``partition-id``; a clear error when it is missing or not an int."""
    if "partition-id" not in node_config:
        raise NodeError("the node config has no partition-id; start the SuperNode with "
                        "--node-config \"partition-id=<client index>\"")
    try:
        return whole_number(node_config["partition-id"])
    except (TypeError, ValueError) as exc:
        raise NodeError(f"node config partition-id must be a whole number (the client index), got "
                        f"{node_config['partition-id']!r}") from exc


def _budget(value: Any) -> float:
    try:
        budget = float(value)
    except (TypeError, ValueError):
        budget = math.nan
    if isinstance(value, bool) or not math.isfinite(budget) or budget <= 0:
        raise NodeError(f"node config budget must be a positive number (of parameters, or of bytes with "
                        f"budget-unit='bytes'), e.g. --node-config \"partition-id=0 budget=2e6\"; got {value!r}")
    return budget


def capabilities(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The node's answer to ``query.capabilities``: its partition and declared resources."""
    declared = [k for k in CAPABILITY_KEYS if str(node_config.get(k, "")).strip()]
    if len(declared) > 1:
        raise NodeError(f"the node config declares {declared}; give at most one of {list(CAPABILITY_KEYS)}")
    out: dict[str, Any] = {"partition-id": partition_id(node_config)}
    for k in declared:
        v = node_config[k]
        out[k] = _budget(v) if k == "budget" else str(v)
    if "budget" in out:
        out["budget-unit"] = str(node_config.get("budget-unit", "params"))
    # The server checks each reply's example count against the partition's size, except for a
    # node that trains on a data set of its own.
    out["own-data"] = bool(str(node_config.get("data", "")).strip())
    return out


def parse_run_config(text: str) -> RunConfig:
    try:
        return from_dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise NodeError(f"the run config sent by the server is not valid TOML: {exc}") from exc


def node_model(cfg: RunConfig) -> tuple[torch.nn.Module, Any]:
    """The base model of ``cfg`` on this node, loaded once per process."""
    device = resolve_device(cfg.device)
    key = (cfg.model, cfg.dtype, str(device))
    if key not in _MODELS:
        model, tok, _ = load_run_model(cfg)
        _MODELS[key] = (model, tok)
    return _MODELS[key]


def node_examples(cfg: RunConfig, node_config: Mapping[str, Any], client: int) -> list[Example]:
    """This node's training examples: its own ``data`` set, or partition ``client`` of the run's data."""
    own = str(node_config.get("data", "")).strip()
    key = (own or cfg.data, repr(sorted(cfg.data_options.__dict__.items())), client if not own else -1,
           f"{cfg.num_clients}/{cfg.seed}")
    if key not in _DATA:
        if own:
            data = load_task_data(own)
            examples = [ex for exs in data.train.values() for ex in exs]
        else:
            data = load_run_data(cfg)
            n = cfg.num_clients or len(data.train)
            if not 0 <= client < n:
                raise NodeError(f"partition-id {client} is outside the run's {n} clients")
            part = partition_of(cfg, data)
            by_id = examples_by_id(data)
            examples = [by_id[i] for i in part.clients[client]]
        # Not cached when empty: every later message must get this error, not a generic one.
        if not examples:
            raise NodeError(f"node of partition {client} holds no training examples")
        _DATA[key] = examples
    return _DATA[key]


def train_task(task: ClientTask, method: str, run_config_toml: str, node_config: Mapping[str, Any]) -> ClientReply:
    """Run one ``train`` task of the run's ``method`` on this node and return the reply.

    Raises
    ------
    NodeError
        For a task meant for another partition, or a method other than the run config's.
    """
    me = partition_id(node_config)
    if task.client != me:
        raise NodeError(f"the server sent client {task.client}'s task to the node of partition {me}")
    cfg = parse_run_config(run_config_toml)
    if method_class(method) is not method_class(cfg.aggregator):
        raise NodeError(f"the task is of method {method!r}, but the run config's aggregator is {cfg.aggregator!r}")
    faults.fire("node.before_train", node_config=node_config, task=task)
    model, tok = node_model(cfg)
    ctx = ClientContext(model, tok, node_examples(cfg, node_config, me), local_train_config(cfg),
                        encoding_options(cfg), dropout=cfg.lora.dropout)
    reply = method_class(method).client_train(ctx, task)
    return faults.fire("node.after_train", node_config=node_config, task=task, reply=reply) or reply
