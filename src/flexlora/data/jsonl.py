"""The generic loader of a JSON list of objects or a JSON Lines file with configurable field
names (:func:`load_jsonl`), and the field-name options' defaults (:data:`JSONL_FIELD_DEFAULTS`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flexlora.data.errors import DataError
from flexlora.data.examples import Example, TaskData
from flexlora.data.holdout import _check_fraction, _check_max_per_task, _split_unseen, _truncate
from flexlora.data.records import _field_str, _label_str, _read_records, _references

__all__ = ["JSONL_FIELD_DEFAULTS", "load_jsonl"]

# The field-name options of :func:`load_jsonl` with their defaults. The run config mirrors them
# (``data_options.*`` and ``eval.*``) and passes on only the ones that differ.
JSONL_FIELD_DEFAULTS: dict[str, str] = {
    "task_field": "task",
    "instruction_field": "instruction",
    "input_field": "input",
    "output_field": "output",
    "id_field": "id",
}


def _option_hint(option: str, value: str, prefix: str | None) -> str:
    """How the user sets a loader option: a keyword argument, or the run config's ``--set``.

    A user of the command line cannot pass keyword arguments, so when the options come from a
    run config (``prefix`` is where they live there, e.g. ``"data_options."``) the suggested fix
    is the override they can type. ``value`` ``"None"`` becomes ``""``, the config's "none".
    """
    if prefix is None:
        return f"pass {option}={value}"
    if value == "None":
        value = '""'
    return f"--set {prefix}{option}={value}"


def load_jsonl(
    path: str | os.PathLike[str],
    *,
    instruction_field: str = "instruction",
    input_field: str | None = "input",
    output_field: str = "output",
    task_field: str | None = "task",
    id_field: str | None = "id",
    unseen_tasks: Sequence[str] = (),
    holdout_fraction: float = 0.0,
    seed: int = 0,
    max_per_task: int | None = None,
    default_task: str | None = None,
    option_prefix: str | None = None,
) -> TaskData:
    """Load a JSON list of objects or a JSON Lines file with configurable field names.

    Parameters
    ----------
    path : str or PathLike
        The file.
    instruction_field, output_field : str
        Required fields. The output may be one string or a non-empty list of acceptable
        strings (``output`` is then the first, ``references`` all of them).
    input_field : str or None, default "input"
        Optional field; a record without it (or ``None``) has input ``""``.
    task_field : str or None, default "task"
        Required field naming each record's task. ``None`` puts every record in one task
        named ``default_task`` (default: the file name without suffix).
    id_field : str or None, default "id"
        Field holding a unique id; when ``None`` or absent from a record the id is
        ``"<file stem>-<line or record number>"``.
    unseen_tasks : sequence of str, default ()
        Tasks held out whole as unseen tasks.
    holdout_fraction : float, default 0.0
        When ``unseen_tasks`` is empty and this is positive, hold out this fraction of each
        task's records instead (``unseen_kind="instances"``; see :func:`~flexlora.data.dolly.load_dolly`).
    seed : int, default 0
        Seed of that held-out selection.
    max_per_task : int or None, default None
        Keep only the first ``max_per_task`` records of each task (file order).
    default_task : str or None, default None
        Task name used when ``task_field`` is ``None``.
    option_prefix : str or None, default None
        Where these options live in a run config (``"data_options."``, ``"eval."``). Error
        messages then suggest the ``--set <prefix><option>=...`` override a command-line user
        can type instead of a keyword argument (``None`` is written ``""`` there).

    Returns
    -------
    TaskData

    Raises
    ------
    DataError
        Missing or empty file, malformed line, missing or mistyped field (naming the line
        and the option that renames the field), duplicate ids, unknown unseen task.
    """
    _check_max_per_task(max_per_task)
    _check_fraction(holdout_fraction)
    p = Path(path).expanduser()
    unit, records = _read_records(p)
    fallback_task = default_task or p.stem
    required = [("task_field", task_field, "each record's task")] if task_field is not None else []
    required += [
        ("instruction_field", instruction_field, "the instruction"),
        ("output_field", output_field, "the answer"),
    ]
    groups: dict[str, list[Example]] = {}
    for line, rec in records:
        at = {"path": p, "line": line, "where": unit}
        _check_required_fields(rec, required, at=at, option_prefix=option_prefix)
        task = fallback_task if task_field is None else _label_str(rec[task_field], task_field, allow_int=False, **at)
        instruction = _field_str(rec, instruction_field, **at)
        text = _field_str(rec, input_field, required=False, **at) if input_field else ""
        refs = _references(rec[output_field], field=output_field, **at)
        raw_id = rec.get(id_field) if id_field else None
        ex_id = _label_str(raw_id, id_field, allow_int=True, **at) if raw_id not in (None, "") else f"{p.stem}-{line}"
        groups.setdefault(task, []).append(
            Example(
                id=ex_id,
                instruction=instruction,
                input=text,
                output=refs[0],
                task=task,
                references=refs,
            )
        )
    _truncate(groups, max_per_task)
    train, unseen, kind = _split_unseen(
        groups,
        unseen_tasks,
        holdout_fraction=holdout_fraction,
        seed=seed,
        source=p,
        kind="tasks",
    )
    try:
        return TaskData(train=train, unseen=unseen, name=f"jsonl:{p}", unseen_kind=kind)
    except DataError as exc:
        fix = f"give every record a unique {id_field!r}" if id_field else "make the ids unique"
        if id_field:
            fix += f", or number the records instead with {_option_hint('id_field', 'None', option_prefix)}"
        raise DataError(exc.problem, path=p, fix=fix + ".") from exc


def _check_required_fields(
    rec: dict[str, Any],
    required: list[tuple[str, str, str]],
    *,
    at: dict[str, Any],
    option_prefix: str | None,
) -> None:
    """Raise one error naming every missing required field of ``rec`` and the option of each.

    All at once, because a file written with other field names usually misses all of them,
    and one fix per run would take the user as many runs as there are fields.
    """
    missing = [(opt, name, what) for opt, name, what in required if name not in rec]
    if not missing:
        return
    names = ", ".join(repr(name) for _, name, _ in missing)
    fixes = [f"name the field that holds {what} with {_option_hint(opt, '<name>', option_prefix)}"
             for opt, _, what in missing]
    if missing[0][0] == "task_field":
        fixes.append(f"put all records in one task with {_option_hint('task_field', 'None', option_prefix)}")
    raise DataError(
        f"missing required field{'s' if len(missing) > 1 else ''} {names} "
        f"(fields present: {sorted(rec)}).",
        fix="; ".join(fixes) + f"; or add {names} to every record.",
        **at,
    )

