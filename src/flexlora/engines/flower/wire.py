"""The messages between the FlexLoRA ServerApp and its ClientApps.

Server to node:

- ``query.capabilities``: empty; the node answers with a ConfigRecord ``capabilities``
  (``partition-id`` and, when its node config declares one, ``client-type``, ``ranks`` or ``budget``).
- ``train``: ConfigRecord ``task`` (round, client index and id, per-module ranks as JSON, alpha,
  rsLoRA flag, type, seed, HetLoRA settings, ``init-seed``, the run's resolved config as TOML), ArrayRecord
  ``init`` (the global adapter at the client's ranks; absent in round 1 and in FLoRA's rounds, where the node
  draws the round's shared fresh adapter from ``init-seed`` instead) and, for FLoRA, ArrayRecord ``base``.

Node to server: ArrayRecord ``update`` (the trained factors) and MetricRecord ``metrics``
(``num-examples``, ``train-loss``, ``steps``). Arrays travel as float32 (exact) or float16; bf16 is
cast. Array keys are ``"<module>::A"`` and ``"<module>::B"``. Everything a peer sends is decoded
defensively: a malformed message raises :class:`WireError` naming the problem.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flexlora.core.types import ClientUpdate, Factors
from flexlora.training.client import ClientSpec, ClientTask

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
MSG_CAPABILITIES = "query.capabilities"
MSG_TRAIN = "train"


class WireError(ValueError):
    """A message that does not follow the FlexLoRA wire format."""


def factors_to_record(factors: Mapping[str, Factors], wire_dtype: str = "float32") -> ArrayRecord:
    """``{module: (A, B)}`` as an ArrayRecord, cast to ``wire_dtype``."""
    dtype = WIRE_DTYPES[wire_dtype]
    rec = ArrayRecord()
    for m, (a, b) in factors.items():
        rec[f"{m}::A"] = Array(a.detach().to("cpu", dtype).contiguous().numpy())
        rec[f"{m}::B"] = Array(b.detach().to("cpu", dtype).contiguous().numpy())
    return rec


def record_to_factors(rec: ArrayRecord) -> dict[str, Factors]:
    """Inverse of :func:`factors_to_record`; factors come back as float32 tensors.

    Raises
    ------
    WireError
        For a key that is not ``<module>::A``/``::B``, a module with only one factor, an array
        that cannot be read, a dtype that is not floating point, or factors that are not 2-D.
    """
    return _decode_factors(rec)[0]


def _decode_factors(rec: ArrayRecord) -> tuple[dict[str, Factors], int]:
    """The factors of ``rec`` and their payload bytes at the wire dtype, counted from the decoded
    arrays: a peer's Array metadata (dtype, shape) is not trusted for the count."""
    nbytes = 0
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key in rec.keys():
        module, sep, which = key.rpartition("::")
        if not sep or which not in ("A", "B") or not module:
            raise WireError(f"array key {key!r} is not '<module>::A' or '<module>::B'")
        try:
            arr = rec[key].numpy()
        except Exception as exc:  # np.load raises several types on garbage
            raise WireError(f"array {key!r} cannot be read ({type(exc).__name__}: {exc})") from exc
        if arr.dtype.kind != "f":
            raise WireError(f"array {key!r} has dtype {arr.dtype}, expected a floating-point dtype")
        if arr.ndim != 2:
            raise WireError(f"array {key!r} has shape {arr.shape}, expected a 2-D factor")
        nbytes += int(arr.nbytes)
        parts.setdefault(module, {})[which] = torch.from_numpy(np.array(arr, dtype=np.float32))
    out = {}
    for m, p in parts.items():
        if set(p) != {"A", "B"}:
            raise WireError(f"module {m!r} has only factor {''.join(p)}; both A and B are needed")
        out[m] = (p["A"], p["B"])
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


def task_content(task: ClientTask, run_config_toml: str, wire_dtype: str = "float32") -> RecordDict:
    """The ``train`` message content for one client."""
    cfg = ConfigRecord({
        "round": task.round,
        "client": task.client,
        "client-id": task.spec.client_id,
        "type": task.spec.type_name,
        "ranks": json.dumps(task.spec.ranks, sort_keys=True),
        "alpha": float(task.spec.alpha),
        "rslora": bool(task.spec.rslora),
        "seed": int(task.seed),
        # -1: no shared fresh adapter (ConfigRecord has no null).
        "init-seed": int(task.init_seed) if task.init_seed is not None else -1,
        "hetlora": json.dumps(list(task.hetlora) if task.hetlora else None),
        "run-config": run_config_toml,
        "wire-dtype": wire_dtype,
    })
    content = RecordDict({"task": cfg})
    if task.init is not None:
        content["init"] = factors_to_record(task.init, wire_dtype)
    if task.base_delta is not None:
        content["base"] = factors_to_record(task.base_delta, wire_dtype)
    return content


def _get(rec: ConfigRecord | MetricRecord, key: str, kind: type | tuple[type, ...], where: str):
    if key not in rec:
        raise WireError(f"{where}: missing field {key!r}")
    v = rec[key]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise WireError(f"{where}: field {key!r} is {type(v).__name__}, expected {kind}")
    return v


def _flag(rec: ConfigRecord, key: str, where: str) -> bool:
    # Absent means False: a peer from before the option speaks plain LoRA.
    return bool(_get(rec, key, bool, where)) if key in rec else False


def _init_seed(c: ConfigRecord) -> int | None:
    # Absent (a peer from before the option) or -1: no shared fresh adapter.
    if "init-seed" not in c:
        return None
    v = int(_get(c, "init-seed", int, "task"))
    if v < -1:
        raise WireError(f"task: 'init-seed' must be a seed >= 0 or -1 for none, got {v}")
    return None if v == -1 else v


def content_task(content: RecordDict) -> tuple[ClientTask, str, str]:
    """Decode a ``train`` message: ``(task, run config TOML, wire dtype)``."""
    if "task" not in content.config_records:
        raise WireError("train message without its 'task' ConfigRecord")
    c = content.config_records["task"]
    try:
        ranks = json.loads(_get(c, "ranks", str, "task"))
        het = json.loads(_get(c, "hetlora", str, "task"))
    except json.JSONDecodeError as exc:
        raise WireError(f"task: ranks/hetlora are not JSON ({exc})") from exc
    if not isinstance(ranks, dict) or not all(isinstance(r, int) and r >= 1 for r in ranks.values()):
        raise WireError("task: 'ranks' must map module names to positive ints")
    spec = ClientSpec(client_id=_get(c, "client-id", str, "task"), ranks=ranks,
                      alpha=float(_get(c, "alpha", (int, float), "task")), type_name=_get(c, "type", str, "task"),
                      rslora=_flag(c, "rslora", "task"))
    init = record_to_factors(content.array_records["init"]) if "init" in content.array_records else None
    base = record_to_factors(content.array_records["base"]) if "base" in content.array_records else None
    task = ClientTask(round=int(_get(c, "round", int, "task")), client=int(_get(c, "client", int, "task")),
                      spec=spec, init=init, seed=int(_get(c, "seed", int, "task")), base_delta=base,
                      hetlora=tuple(het) if het else None,  # type: ignore[arg-type]
                      init_seed=_init_seed(c))
    return task, _get(c, "run-config", str, "task"), _get(c, "wire-dtype", str, "task")


def reply_content(update: ClientUpdate, train_loss: float, steps: int, wire_dtype: str = "float32") -> RecordDict:
    """The node's reply to a ``train`` message."""
    metrics = MetricRecord({"num-examples": int(update.num_examples), "train-loss": float(train_loss),
                            "steps": int(steps)})
    meta = ConfigRecord({"client-id": update.client_id or "", "alpha": float(update.alpha),
                         "rslora": bool(update.rslora)})
    return RecordDict({"update": factors_to_record(update.factors, wire_dtype), "metrics": metrics, "meta": meta})


def decode_reply(content: RecordDict) -> tuple[ClientUpdate, float, int, int]:
    """``(update, train loss, steps, bytes up)`` of a node's ``train`` reply.

    Raises
    ------
    WireError
        When a record or field is missing or of the wrong type, or the arrays are malformed.
        Shapes, ranks and finiteness are checked by the federation against the task.
    """
    if "update" not in content.array_records:
        raise WireError("reply without its 'update' ArrayRecord")
    if "metrics" not in content.metric_records or "meta" not in content.config_records:
        raise WireError("reply without its 'metrics'/'meta' records")
    m, meta = content.metric_records["metrics"], content.config_records["meta"]
    n = _get(m, "num-examples", int, "reply metrics")
    loss = float(_get(m, "train-loss", (int, float), "reply metrics"))
    steps = int(_get(m, "steps", int, "reply metrics"))
    # A client whose training diverges stops with an error reply, so a non-finite loss here is garbage.
    if not math.isfinite(loss) or loss < 0:
        raise WireError(f"reply metrics: train-loss is {loss}, expected a finite loss >= 0")
    if steps < 0:
        raise WireError(f"reply metrics: steps is {steps}, expected >= 0")
    alpha = float(_get(meta, "alpha", (int, float), "reply meta"))
    if not math.isfinite(alpha):
        raise WireError(f"reply meta: alpha is {alpha}")
    factors, nbytes = _decode_factors(content.array_records["update"])
    update = ClientUpdate(factors=factors, num_examples=n, alpha=alpha, rslora=_flag(meta, "rslora", "reply meta"),
                          client_id=_get(meta, "client-id", str, "reply meta") or None,
                          metadata={"train_loss": loss, "steps": steps})
    return update, loss, steps, nbytes
