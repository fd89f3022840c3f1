"""The faults the tests inject through flexlora's test seam (:mod:`flexlora.engines.faults`).

In this process a test calls the ``install_*`` functions directly. A test that starts processes
(a CLI run it kills, Flower SuperNodes) puts this folder on their ``PYTHONPATH`` and sets
``FLEXLORA_TEST_SEAM`` (see :func:`seam_env`); ``sitecustomize.py`` here then installs the plan in
every Python process that starts.

A node's faults come from its node config, ``fault = "<kind>@<round>"``:

- ``kill@R``: SIGKILL the ClientApp process when round R's task arrives (a crashed node);
- ``sleep@R:S``: sleep S seconds first (a node slower than the round timeout);
- ``nan@R``, ``shape@R``, ``rank@R``: corrupt the first module's factors of its reply (a NaN, an
  A with one input column too many, one rank too few);
- ``count@R``: claim ten times its examples (ten times its aggregation weight);
- ``scale@R:F``: multiply every module's ``B`` of its reply by ``F`` (``F`` times its update's
  product: ``scale@*:-1000`` poisons every round).

``R`` is a round number, or ``*`` for every round.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flexlora.engines import faults

SEAM_DIR = Path(__file__).resolve().parent


def _fault_at(node_config: Mapping[str, Any], rnd: int) -> str:
    spec = str(node_config.get("fault", ""))
    kind, _, at = spec.partition("@")
    when = at.split(":")[0]
    return kind if at and (when == "*" or int(when) == rnd) else ""


def _before(node_config: Mapping[str, Any], task: Any) -> None:
    kind = _fault_at(node_config, task.round)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "sleep":
        time.sleep(float(str(node_config["fault"]).split(":")[1]))


def _after(node_config: Mapping[str, Any], task: Any, reply: Any) -> Any:
    kind = _fault_at(node_config, task.round)
    if kind in ("nan", "shape", "rank"):
        tensors = dict(reply.tensors)
        m = sorted(k.removesuffix("::A") for k in tensors if k.endswith("::A"))[0]
        a, b = tensors[f"{m}::A"], tensors[f"{m}::B"]
        if kind == "nan":
            a = a.clone()
            a[0, 0] = float("nan")
        elif kind == "shape":
            a = torch.zeros(a.shape[0], a.shape[1] + 1)
        else:
            a, b = a[:-1].clone(), b[:, :-1].clone()
        tensors[f"{m}::A"], tensors[f"{m}::B"] = a, b
        return dataclasses.replace(reply, tensors=tensors)
    if kind == "count":
        return dataclasses.replace(reply, num_examples=reply.num_examples * 10)
    if kind == "scale":
        return scaled_reply(reply, float(str(node_config["fault"]).split(":")[1]))
    return None


def scaled_reply(reply: Any, factor: float) -> Any:
    """``reply`` with every module's ``B`` multiplied by ``factor`` (its product scaled by it)."""
    tensors = {k: (v * factor if k.endswith("::B") else v) for k, v in reply.tensors.items()}
    return dataclasses.replace(reply, tensors=tensors)


def install_local_poison(client: int, factor: float) -> None:
    """The in-process engine's client ``client`` replies ``factor`` times its update in every round."""
    def hook(task: Any, reply: Any) -> Any:
        return scaled_reply(reply, factor) if task.client == client else None
    faults.set_hook("local.after_train", hook)


def install_node_faults() -> None:
    """Honour the ``fault`` key of every node config (module docstring)."""
    faults.set_hook("node.before_train", _before)
    faults.set_hook("node.after_train", _after)


def install_kill_after_client(rnd: int, done: int) -> None:
    """SIGKILL this process once the in-process engine has trained the ``done``-th client of
    round ``rnd`` (mid-round, before the round's checkpoint)."""
    def hook(rnd: int, done: int, _at: tuple[int, int] = (rnd, done)) -> None:
        if (rnd, done) == _at:
            os.kill(os.getpid(), signal.SIGKILL)
    faults.set_hook("local.client_done", hook)


def install_server_kill(rnd: int) -> None:
    """SIGKILL the Flower server once it has the replies of round ``rnd`` (before it aggregates)."""
    def hook(rnd: int, _at: int = rnd) -> None:
        if rnd == _at:
            os.kill(os.getpid(), signal.SIGKILL)
    faults.set_hook("server.replies_in", hook)


def install(plan: str) -> None:
    """Install a plan: ``;``-separated ``node-faults``, ``kill-after-client=R:C``, ``server-kill=R``."""
    for item in filter(None, (p.strip() for p in plan.split(";"))):
        name, _, arg = item.partition("=")
        if name == "node-faults":
            install_node_faults()
        elif name == "kill-after-client":
            r, c = (int(x) for x in arg.split(":"))
            install_kill_after_client(r, c)
        elif name == "server-kill":
            install_server_kill(int(arg))
        else:
            raise ValueError(f"unknown fault plan item {item!r}")


def seam_env(plan: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) for a child process that installs ``plan`` at start-up."""
    out = dict(os.environ if env is None else env)
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(SEAM_DIR), out.get("PYTHONPATH", "")) if p)
    out["FLEXLORA_TEST_SEAM"] = plan
    return out
