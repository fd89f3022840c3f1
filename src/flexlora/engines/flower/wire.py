"""The messages between the flexlora ServerApp and its ClientApps.

The wire knows no method: a task and a reply are named tensors plus plain JSON metadata, whose
meaning belongs to the run's method (:mod:`flexlora.methods`), so every method runs on Flower.

Server to node:

- ``query.capabilities``: empty; the node answers with a ConfigRecord ``capabilities``
  (``partition-id`` and, when its node config declares one, ``client-type``, ``ranks`` or ``budget``).
- ``train``: ConfigRecord ``task`` (wire version, round, client index and id, per-module ranks as
  JSON, alpha, rsLoRA flag, type, seed, the method's ``meta`` as JSON, the run's resolved config as
  TOML, the wire dtype) and ArrayRecord ``tensors`` (the method's tensors for this client, e.g. the
  global adapter at its ranks).

Node to server: ArrayRecord ``tensors`` (the method's reply, e.g. the trained factors), MetricRecord
``metrics`` (``num-examples``, ``train-loss``, ``steps``) and ConfigRecord ``meta`` (the method's
reply metadata as JSON). Arrays travel as float32 (exact) or float16; bf16 is cast. Everything a
peer sends is decoded defensively: a malformed message raises :class:`WireError` naming the problem.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flexlora.methods import ClientReply
from flexlora.training.client import ClientSpec, ClientTask

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
MSG_CAPABILITIES = "query.capabilities"
MSG_TRAIN = "train"


class WireError(ValueError):
    """A message that does not follow the FlexLoRA wire format."""


def tensors_to_record(tensors: Mapping[str, torch.Tensor], wire_dtype: str = "float32") -> ArrayRecord:
    """Named tensors as an ArrayRecord, cast to ``wire_dtype``."""
    dtype = WIRE_DTYPES[wire_dtype]
    rec = ArrayRecord()
    for name, t in tensors.items():
        rec[name] = Array(t.detach().to("cpu", dtype).contiguous().numpy())
    return rec


def record_to_tensors(rec: ArrayRecord) -> tuple[dict[str, torch.Tensor], int]:
    """The named float32 tensors of ``rec`` and their payload bytes at the wire dtype, counted from
    the decoded arrays (a peer's Array metadata, dtype and shape, is not trusted for the count).

    Raises
    ------
    WireError
        For an array that cannot be read or whose dtype is not floating point.
    """
    nbytes = 0
    out: dict[str, torch.Tensor] = {}
    for key in rec.keys():
        try:
            arr = rec[key].numpy()
        except Exception as exc:  # np.load raises several types on garbage
            raise WireError(f"array {key!r} cannot be read ({type(exc).__name__}: {exc})") from exc
        if arr.dtype.kind != "f":
            raise WireError(f"array {key!r} has dtype {arr.dtype}, expected a floating-point dtype")
        nbytes += int(arr.nbytes)
        out[key] = torch.from_numpy(np.array(arr, dtype=np.float32))
    return out, nbytes


def whole_number(value: Any) -> int:
    """``value`` as an int when it is one: an int (not a bool), an integral float, or a string of
    digits. Raises ValueError otherwise (``int()`` would truncate 2.7 and accept True)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is a bool, not a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().removeprefix("-").isdigit():
        return int(value.strip())
    raise ValueError(f"{value!r} is not a whole number")


def record_nbytes(rec: ArrayRecord | None) -> int:
    """Payload bytes of an ArrayRecord's arrays (without the numpy headers): the same count as
    :func:`flexlora.training.client.factor_bytes` of the factors at the wire dtype."""
    if rec is None:
        return 0
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in rec.values())


WIRE_VERSION = 2
"""Version of this message layout; a node refuses a task of another version by name."""


def _json(value: Any, where: str) -> str:
    try:
        # Key order kept: a method may iterate its metadata in order (mask sizes per module).
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise WireError(f"{where}: the method's metadata is not plain JSON ({exc})") from exc


def _unjson(rec: ConfigRecord, key: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(_get(rec, key, str, where))
    except json.JSONDecodeError as exc:
        raise WireError(f"{where}: {key!r} is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise WireError(f"{where}: {key!r} must be a JSON object, got {type(value).__name__}")
    return value


def task_content(task: ClientTask, method: str, run_config_toml: str, wire_dtype: str = "float32") -> RecordDict:
    """The ``train`` message content for one client of the run's ``method``."""
    cfg = ConfigRecord({
        "wire-version": WIRE_VERSION,
        "method": method,
        "round": task.round,
        "client": task.client,
        "client-id": task.spec.client_id,
        "type": task.spec.type_name,
        "ranks": json.dumps(task.spec.ranks, sort_keys=True),
        "alpha": float(task.spec.alpha),
        "rslora": bool(task.spec.rslora),
        "seed": int(task.seed),
        "meta": _json(task.meta, "task"),
        "run-config": run_config_toml,
        "wire-dtype": wire_dtype,
    })
    return RecordDict({"task": cfg, "tensors": tensors_to_record(task.tensors, wire_dtype)})


def _get(rec: ConfigRecord | MetricRecord, key: str, kind: type | tuple[type, ...], where: str):
    if key not in rec:
        raise WireError(f"{where}: missing field {key!r}")
    v = rec[key]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise WireError(f"{where}: field {key!r} is {type(v).__name__}, expected {kind}")
    return v


def content_task(content: RecordDict) -> tuple[ClientTask, str, str, str]:
    """Decode a ``train`` message: ``(task, method name, run config TOML, wire dtype)``."""
    if "task" not in content.config_records:
        raise WireError("train message without its 'task' ConfigRecord")
    c = content.config_records["task"]
    version = c.get("wire-version")
    if version != WIRE_VERSION:
        raise WireError(f"task: wire version {version!r}, but this node speaks version {WIRE_VERSION}; run the same "
                        "flexlora version on the server and the nodes")
    try:
        ranks = json.loads(_get(c, "ranks", str, "task"))
    except json.JSONDecodeError as exc:
        raise WireError(f"task: ranks are not JSON ({exc})") from exc
    if not isinstance(ranks, dict) or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1
                                              for r in ranks.values()):
        raise WireError("task: 'ranks' must map module names to positive ints")
    spec = ClientSpec(client_id=_get(c, "client-id", str, "task"), ranks=ranks,
                      alpha=float(_get(c, "alpha", (int, float), "task")), type_name=_get(c, "type", str, "task"),
                      rslora=bool(_get(c, "rslora", bool, "task")))
    tensors = record_to_tensors(content.array_records["tensors"])[0] if "tensors" in content.array_records else {}
    task = ClientTask(round=int(_get(c, "round", int, "task")), client=int(_get(c, "client", int, "task")),
                      spec=spec, seed=int(_get(c, "seed", int, "task")), tensors=tensors,
                      meta=_unjson(c, "meta", "task"))
    return task, _get(c, "method", str, "task"), _get(c, "run-config", str, "task"), _get(c, "wire-dtype", str, "task")


def reply_content(reply: ClientReply, wire_dtype: str = "float32") -> RecordDict:
    """The node's reply to a ``train`` message."""
    metrics = MetricRecord({"num-examples": int(reply.num_examples), "train-loss": float(reply.train_loss),
                            "steps": int(reply.steps)})
    meta = ConfigRecord({"meta": _json(reply.meta, "reply")})
    return RecordDict({"tensors": tensors_to_record(reply.tensors, wire_dtype), "metrics": metrics, "meta": meta})


def decode_reply(content: RecordDict) -> tuple[ClientReply, int]:
    """``(reply, bytes up)`` of a node's ``train`` reply.

    Raises
    ------
    WireError
        When a record or field is missing or of the wrong type, or the arrays are malformed.
        What the tensors must be (modules, shapes, ranks, finiteness) is checked by the method
        against the task.
    """
    if "tensors" not in content.array_records:
        raise WireError("reply without its 'tensors' ArrayRecord")
    if "metrics" not in content.metric_records or "meta" not in content.config_records:
        raise WireError("reply without its 'metrics'/'meta' records")
    m = content.metric_records["metrics"]
    n = _get(m, "num-examples", int, "reply metrics")
    loss = float(_get(m, "train-loss", (int, float), "reply metrics"))
    steps = int(_get(m, "steps", int, "reply metrics"))
    # A client whose training diverges stops with an error reply, so a non-finite loss here is garbage.
    if not math.isfinite(loss) or loss < 0:
        raise WireError(f"reply metrics: train-loss is {loss}, expected a finite loss >= 0")
    if steps < 0:
        raise WireError(f"reply metrics: steps is {steps}, expected >= 0")
    meta = _unjson(content.config_records["meta"], "meta", "reply meta")
    tensors, nbytes = record_to_tensors(content.array_records["tensors"])
    return ClientReply(tensors=tensors, num_examples=n, meta=meta, train_loss=loss, steps=steps), nbytes
