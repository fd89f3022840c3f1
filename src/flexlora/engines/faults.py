"""The one test seam of flexlora: named points where a test injects a fault.

Production code calls :func:`fire` at a few points of a run; nothing happens unless a hook was
installed with :func:`set_hook`. No environment variable or config key is read: a test in this
process installs hooks directly; a test that starts processes (a CLI run to kill, Flower
SuperNodes) puts ``tests/seam`` on their ``PYTHONPATH``, whose ``sitecustomize`` installs the
hooks its plan names (``tests/seam/sitecustomize.py``).

Points and their keyword arguments:

``local.after_train`` (``task``, ``reply``)
    The in-process engine trained a task's client; a hook may return a replacement
    :class:`~flexlora.methods.ClientReply` (a poisoned one).
``local.client_done`` (``rnd``, ``done``)
    The in-process engine trained the ``done``-th client of round ``rnd`` (before the round's
    checkpoint).
``server.replies_in`` (``rnd``)
    The Flower server has the replies of round ``rnd`` (before it aggregates them).
``node.before_train`` (``node_config``, ``task``)
    A Flower node received its task.
``node.after_train`` (``node_config``, ``task``, ``reply``)
    A Flower node trained its task; a hook may return a replacement
    :class:`~flexlora.methods.ClientReply` (a corrupted one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

POINTS = ("local.after_train", "local.client_done", "server.replies_in", "node.before_train", "node.after_train")

_HOOKS: dict[str, Callable[..., Any]] = {}


def set_hook(point: str, hook: Callable[..., Any] | None) -> None:
    """Install ``hook`` at ``point`` (None removes it).

    Raises
    ------
    ValueError
        For a point that does not exist.
    """
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; the points are {', '.join(POINTS)}")
    if hook is None:
        _HOOKS.pop(point, None)
    else:
        _HOOKS[point] = hook


def clear_hooks() -> None:
    """Remove every hook."""
    _HOOKS.clear()


def fire(point: str, **kwargs: Any) -> Any:
    """Call the hook at ``point`` with ``kwargs`` (its result, or None without a hook)."""
    hook = _HOOKS.get(point)
    return hook(**kwargs) if hook is not None else None
