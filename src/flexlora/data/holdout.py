"""Checks and splits shared by the file loaders: ``max_per_task`` truncation, and the split
of a loaded data set's tasks into train and unseen (whole tasks, or held-out instances).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from flexlora.data._util import derive_seed
from flexlora.data.errors import DataError
from flexlora.data.examples import Example

__all__: list[str] = []


def _check_max_per_task(max_per_task: int | None) -> None:
    if max_per_task is not None and (not isinstance(max_per_task, int) or max_per_task < 1):
        raise DataError(f"max_per_task must be a positive integer or None, got {max_per_task!r}.")


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"holdout_fraction must be in [0, 1), got {fraction!r}.")


def _hold_out(
    groups: dict[str, list[Example]], fraction: float, seed: int
) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    """Split each task into train and held-out instances.

    Each task holds out ``round(fraction * n)`` examples, clamped to ``[1, n - 1]`` when
    ``fraction > 0`` and ``n >= 2`` (so every task keeps at least one training example and
    is evaluated on at least one); a task of one example stays wholly in train. The held-out
    positions are drawn by a ``random.Random`` seeded from ``(seed, task)``, so a task's
    split does not change when other tasks are added or removed. File order is kept on
    both sides.
    """
    train: dict[str, list[Example]] = {}
    held: dict[str, list[Example]] = {}
    for task, examples in groups.items():
        n = len(examples)
        k = round(fraction * n) if n >= 2 else 0
        if fraction > 0 and n >= 2:
            k = min(max(k, 1), n - 1)
        chosen = set(random.Random(derive_seed("holdout", seed, task)).sample(range(n), k))
        train[task] = [ex for i, ex in enumerate(examples) if i not in chosen]
        if chosen:
            held[task] = [ex for i, ex in enumerate(examples) if i in chosen]
    return train, held


def _split_unseen(
    groups: dict[str, list[Example]],
    unseen: Sequence[str],
    *,
    holdout_fraction: float,
    seed: int,
    source: Path,
    kind: str,
) -> tuple[dict[str, list[Example]], dict[str, list[Example]], str]:
    """Move the named tasks to ``unseen``; with none named, hold out instances instead."""
    if isinstance(unseen, str):
        unseen = (unseen,)
    unseen = list(dict.fromkeys(unseen))
    missing = [t for t in unseen if t not in groups]
    if missing:
        raise DataError(
            f"unseen {kind} {missing} do not occur in the data.",
            path=source,
            fix=f"choose from the {kind} present: {sorted(groups)}.",
        )
    if unseen:
        train = {t: v for t, v in groups.items() if t not in unseen}
        held = {t: groups[t] for t in unseen}
        if not train:
            raise DataError(
                f"every {kind[:-1]} was held out as unseen; nothing is left to train on.",
                path=source,
                fix=f"hold out fewer {kind}.",
            )
        return train, held, "tasks"
    if holdout_fraction > 0:
        train, held = _hold_out(groups, holdout_fraction, seed)
        return train, held, "instances"
    return dict(groups), {}, "tasks"


def _truncate(groups: dict[str, list[Example]], max_per_task: int | None) -> None:
    # First N in file order: deterministic and independent of any seed.
    if max_per_task is not None:
        for task in groups:
            groups[task] = groups[task][:max_per_task]
