"""Loaders that turn instruction data on disk into :class:`~flexlora.data.examples.TaskData`.

Sources:

- Natural Instructions v2 (Super-NaturalInstructions) in the upstream layout
  (``root/tasks/<task>.json`` and ``root/splits/<split>/{train,test}_tasks.txt``):
  :func:`load_natural_instructions`.
- Dolly-15k JSON Lines (``instruction``, ``context``, ``response``, ``category``):
  :func:`load_dolly`.
- Any JSON list of objects or JSON Lines file with configurable field names: :func:`load_jsonl`.
- The generated ``builtin:demo-tasks``: :func:`flexlora.data.demo_tasks.load_demo_tasks`.

:func:`load_task_data` picks the right loader from a spec string; :func:`load_eval_data` loads
a separate data set to evaluate on.

The loaders of each format live in their own modules (:mod:`flexlora.data.natural_instructions`,
:mod:`flexlora.data.dolly`, :mod:`flexlora.data.jsonl`, reading records in
:mod:`flexlora.data.records`); this module picks one and re-exports their public names.

Every problem with the input raises :class:`DataError`, naming the file, the line or record
number where there is one, and the fix.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flexlora.data.demo_tasks import DEMO_SPEC, load_demo_tasks
from flexlora.data.dolly import (
    DOLLY_CATEGORIES,
    DOLLY_DEFAULT_UNSEEN,
    DOLLY_FIELDS,
    DOLLY_HUB_NAME,
    load_dolly,
)
from flexlora.data.errors import DataError
from flexlora.data.examples import TaskData
from flexlora.data.jsonl import JSONL_FIELD_DEFAULTS, load_jsonl
from flexlora.data.natural_instructions import load_natural_instructions
from flexlora.data.records import _first_record, read_records

__all__ = [
    "DOLLY_CATEGORIES",
    "DOLLY_DEFAULT_UNSEEN",
    "DOLLY_FIELDS",
    "DOLLY_HUB_NAME",
    "JSONL_FIELD_DEFAULTS",
    "DataError",
    "load_dolly",
    "load_eval_data",
    "load_jsonl",
    "load_natural_instructions",
    "load_task_data",
    "read_records",
]

_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")

_ACCEPTED = (
    f"'{DEMO_SPEC}'; a Natural Instructions directory holding tasks/ and splits/; "
    f"{DOLLY_HUB_NAME!r} or a Dolly .jsonl/.json file (instruction, context, response, "
    "category); any other .json/.jsonl file of instruction records"
)


def _call_with_options(
    loader: Callable[..., TaskData], spec: Any, options: dict[str, Any]
) -> TaskData:
    params = inspect.signature(loader).parameters
    accepted = [n for n, p in params.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "option_prefix"]
    unknown = sorted(set(options) - set(accepted) - {"option_prefix"})
    if unknown:
        raise DataError(
            f"{loader.__name__} does not take option(s) {unknown}.",
            fix=f"use only {accepted}.",
        )
    if spec is None:
        return loader(**options)
    return loader(spec, **options)


def _dolly_options(options: dict[str, Any]) -> dict[str, Any]:
    # Every loader takes ``unseen_tasks``; Dolly's tasks are its categories.
    if "unseen_tasks" not in options:
        return options
    if "unseen_categories" in options:
        raise DataError(
            "both unseen_tasks and unseen_categories were given.", fix="pass only one of them."
        )
    out = dict(options)
    out["unseen_categories"] = out.pop("unseen_tasks")
    return out


def _spec_fix(spec_key: str | None) -> str:
    """The fix for a spec that names nothing loadable, in the caller's terms."""
    if spec_key is None:
        return f"pass one of: {_ACCEPTED}."
    return f"set {spec_key} (--set {spec_key}=<path>) to one of: {_ACCEPTED}."


_KIND_NAMES = {
    "demo": f"the built-in {DEMO_SPEC!r}",
    "ni": "a Natural Instructions directory",
    "dolly-hub": f"the Hub data set {DOLLY_HUB_NAME!r}",
}


def _resolve_spec(text: str, *, generic: bool, spec_key: str | None) -> tuple[str, Path | None]:
    """Which loader ``text`` names: ``("demo" | "ni" | "dolly-hub" | "dolly" | "jsonl", path)``.

    ``generic``: field names were given, so a JSON file is read by :func:`load_jsonl` even when
    its first record looks like Dolly's (the user said which fields to read).
    """
    if text == DEMO_SPEC:
        return "demo", None
    if text.startswith("builtin:"):
        raise DataError(f"unknown builtin data set {text!r}.", fix=_spec_fix(spec_key))
    path = Path(text).expanduser()
    if not path.exists():
        if text == DOLLY_HUB_NAME:
            return "dolly-hub", None
        raise DataError("no such file or directory.", path=path, fix=_spec_fix(spec_key))
    if path.is_dir():
        if (path / "tasks").is_dir() and (path / "splits").is_dir():
            return "ni", path
        raise DataError(
            "directory has no tasks/ and splits/ sub-directories.", path=path, fix=_spec_fix(spec_key)
        )
    if path.suffix.lower() in _JSON_SUFFIXES:
        if not generic and all(f in _first_record(path) for f in DOLLY_FIELDS):
            return "dolly", path
        return "jsonl", path
    raise DataError(
        f"unsupported file type {path.suffix or '(no suffix)'!r}.", path=path, fix=_spec_fix(spec_key)
    )


def _fields_not_applicable(
    fields: Sequence[str], kind: str, where: str | Path, option_prefix: str | None
) -> DataError:
    names = [f"{option_prefix or ''}{f}" for f in fields]
    what = _KIND_NAMES[kind]
    if option_prefix is None:
        fix = "drop those options."
    else:
        fix = f"remove {', '.join(names)} from the config (or --set each back to its default)."
    return DataError(
        f"the field-name option(s) {names} apply only to a generic JSON/JSONL file, but this is "
        f"{what}, whose fields are fixed by its format.",
        path=where,
        fix=fix,
    )


def load_task_data(
    spec: str | os.PathLike[str],
    *,
    spec_key: str | None = None,
    option_prefix: str | None = None,
    **options: Any,
) -> TaskData:
    """Load a data set from a spec string, choosing the loader from what the spec names.

    Parameters
    ----------
    spec : str or PathLike
        - ``"builtin:demo-tasks"``: :func:`~flexlora.data.demo_tasks.load_demo_tasks`;
        - a directory with ``tasks/`` and ``splits/``: :func:`load_natural_instructions`;
        - ``"databricks/databricks-dolly-15k"`` (when no such local path exists), or a
          ``.json``/``.jsonl`` file whose first record has ``instruction``, ``context``,
          ``response`` and ``category`` and for which no field-name option is given:
          :func:`load_dolly`;
        - any other ``.json``/``.jsonl``/``.ndjson`` file: :func:`load_jsonl`.
    spec_key : str or None, default None
        The run-config key that holds ``spec`` (``"data"``, ``"eval.data"``), so that the fix of
        a bad spec names it.
    option_prefix : str or None, default None
        Where ``options`` live in a run config (``"data_options."``), so that fixes suggest the
        ``--set`` override a command-line user can type (see :func:`load_jsonl`).
    **options
        Keyword options of the chosen loader. ``max_per_task`` and ``unseen_tasks`` are
        accepted by every loader (for Dolly, ``unseen_tasks`` means ``unseen_categories``).
        The field-name options of :func:`load_jsonl` (:data:`JSONL_FIELD_DEFAULTS`) select it
        for any JSON file and are an error for the other sources.

    Returns
    -------
    TaskData

    Raises
    ------
    DataError
        Unknown spec (listing what is accepted), an option the chosen loader does not
        take, or any error of the loader.
    """
    text = os.fspath(spec)
    fields = [f for f in JSONL_FIELD_DEFAULTS if f in options]
    kind, path = _resolve_spec(text, generic=bool(fields), spec_key=spec_key)
    if fields and kind != "jsonl":
        raise _fields_not_applicable(fields, kind, path or text, option_prefix)
    if kind == "demo":
        return _call_with_options(load_demo_tasks, None, options)
    if kind == "ni":
        return _call_with_options(load_natural_instructions, path, options)
    if kind in ("dolly", "dolly-hub"):
        return _call_with_options(load_dolly, path or text, _dolly_options(options))
    return _call_with_options(load_jsonl, path, {**options, "option_prefix": option_prefix})


def load_eval_data(
    spec: str | os.PathLike[str],
    *,
    max_per_task: int | None = None,
    spec_key: str | None = None,
    option_prefix: str | None = None,
    **field_options: str | None,
) -> TaskData:
    """Load a data set to evaluate on, separate from the training data.

    Parameters
    ----------
    spec : str or PathLike
        As for :func:`load_task_data`. What is evaluated depends on the source:

        - a Natural Instructions directory: its test-split tasks (the train-split task files
          are not read);
        - a JSON/JSONL file (Dolly or generic): every task in it, with all its records;
        - ``"builtin:demo-tasks"``: its unseen tasks.
    max_per_task : int or None, default None
        Keep only the first ``max_per_task`` examples of each task (file order).
    spec_key, option_prefix : str or None, default None
        As for :func:`load_task_data` (e.g. ``"eval.data"`` and ``"eval."``).
    **field_options
        The field-name options of :func:`load_jsonl` (:data:`JSONL_FIELD_DEFAULTS`), for a
        generic JSON/JSONL file only.

    Returns
    -------
    TaskData
        ``train`` empty; ``unseen`` the tasks to evaluate on (``unseen_kind="tasks"``).

    Raises
    ------
    DataError
        An option other than the field names, a field name for a source other than a JSON
        file, no task to evaluate, or any error of the loader.
    """
    text = os.fspath(spec)
    unknown = sorted(set(field_options) - set(JSONL_FIELD_DEFAULTS))
    if unknown:
        raise DataError(
            f"load_eval_data does not take option(s) {unknown}.",
            fix=f"use only max_per_task and {list(JSONL_FIELD_DEFAULTS)}.",
        )
    kind, path = _resolve_spec(text, generic=bool(field_options), spec_key=spec_key)
    if field_options and kind != "jsonl":
        raise _fields_not_applicable(list(field_options), kind, path or text, option_prefix)
    if kind == "demo":
        data = load_demo_tasks(max_per_task=max_per_task)
        groups = data.unseen
    elif kind == "ni":
        data = load_natural_instructions(path or text, max_per_task=max_per_task, unseen_only=True)
        groups = data.unseen
    elif kind in ("dolly", "dolly-hub"):
        # No category held out and no instance held out: every record is evaluated.
        data = load_dolly(path or text, unseen_categories=(), holdout_fraction=0.0,
                          max_per_task=max_per_task)
        groups = data.train
    else:
        data = load_jsonl(path or text, max_per_task=max_per_task, option_prefix=option_prefix,
                          **field_options)  # type: ignore[arg-type]
        groups = data.train
    return TaskData(train={}, unseen=dict(groups), name=f"eval:{data.name}")
