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

Every problem with the input raises :class:`DataError`, naming the file, the line or record
number where there is one, and the fix.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flexlora.data._util import derive_seed
from flexlora.data.demo_tasks import DEMO_SPEC, load_demo_tasks
from flexlora.data.errors import DataError
from flexlora.data.examples import Example, TaskData

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

logger = logging.getLogger(__name__)

DOLLY_HUB_NAME = "databricks/databricks-dolly-15k"
DOLLY_HUB_FILENAME = "databricks-dolly-15k.jsonl"
DOLLY_FIELDS = ("instruction", "context", "response", "category")
DOLLY_CATEGORIES = (
    "open_qa",
    "general_qa",
    "classification",
    "closed_qa",
    "brainstorming",
    "information_extraction",
    "summarization",
    "creative_writing",
)
# The two smallest categories (1188 + 709 of 15011 records), so holding them out costs the
# least training data. Both have a plausible zero-shot path from the trained categories:
# summarization is context-grounded generation like closed_qa / information_extraction, and
# creative_writing is open-ended generation like brainstorming / open_qa.
DOLLY_DEFAULT_UNSEEN = ("summarization", "creative_writing")

_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")

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


# -- reading files -----------------------------------------------------------------------


def _check_file(path: Path, what: str, fix: str) -> None:
    if not path.exists():
        raise DataError(f"{what} does not exist.", path=path, fix=fix)
    if not path.is_file():
        raise DataError(f"{what} is not a regular file.", path=path, fix=fix)


def _read_text(path: Path) -> str:
    try:
        # utf-8-sig: files saved by some editors start with a byte-order mark.
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"not valid UTF-8 (byte {exc.start}).", path=path, fix="re-save the file as UTF-8."
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot be read: {exc.strerror}.", path=path) from exc


def _load_json_document(path: Path) -> Any:
    text = _read_text(path)
    if not text.strip():
        raise DataError("the file is empty.", path=path, fix="point to a non-empty JSON file.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"malformed JSON: {exc.msg} (column {exc.colno}).",
            path=path,
            line=exc.lineno,
            fix="repair the JSON syntax at that position.",
        ) from exc


def read_records(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    """Read a JSON list of objects or a JSON Lines file.

    The format is chosen from the content, not the suffix: a file whose first non-blank
    character is ``[`` is one JSON array; anything else is read as JSON Lines (one object a
    line, blank lines skipped).

    Parameters
    ----------
    path : str or PathLike
        The file.

    Returns
    -------
    list of (int, dict)
        ``(number, record)`` pairs: the 1-based line number for JSON Lines, the 1-based
        position in the array for a JSON list.

    Raises
    ------
    DataError
        Missing or empty file, malformed JSON (with its line), or a record that is not an
        object.
    """
    return _read_records(path)[1]


def _read_records(
    path: str | os.PathLike[str],
) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """:func:`read_records`, plus the unit of the numbers ("line" or "record")."""
    p = Path(path).expanduser()
    _check_file(p, "data file", "pass the path of an existing .json or .jsonl file.")
    text = _read_text(p)
    stripped = text.lstrip()
    if not stripped:
        raise DataError("the file is empty.", path=p, fix="point to a file with records.")
    records: list[tuple[int, dict[str, Any]]] = []
    if stripped.startswith("["):
        data = _load_json_document(p)
        for i, rec in enumerate(data, start=1):
            if not isinstance(rec, dict):
                raise DataError(
                    f"expected a JSON object, got {type(rec).__name__}.",
                    path=p,
                    line=i,
                    where="record",
                    fix="make every element of the list an object with the data fields.",
                )
            records.append((i, rec))
    else:
        # split("\n"), not splitlines(): the latter also breaks at U+2028 and friends,
        # which JSON allows unescaped inside strings.
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                if not records:
                    _reject_single_document(p, text)
                raise DataError(
                    f"malformed JSON line: {exc.msg} (column {exc.colno}).",
                    path=p,
                    line=lineno,
                    fix="make every line one complete JSON object (JSON Lines format).",
                ) from exc
            if not isinstance(rec, dict):
                raise DataError(
                    f"expected a JSON object, got {type(rec).__name__}.",
                    path=p,
                    line=lineno,
                    fix="make every line one JSON object with the data fields.",
                )
            records.append((lineno, rec))
    if not records:
        raise DataError("the file holds no records.", path=p, fix="add at least one record.")
    return ("record" if stripped.startswith("[") else "line"), records


def _reject_single_document(path: Path, text: str) -> None:
    """Give a better error when a pretty-printed single JSON object was passed as data."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return
    if isinstance(doc, dict):
        raise DataError(
            "the file holds one JSON object, not a list of records.",
            path=path,
            fix="use a JSON list of objects or JSON Lines (one object per line); for a "
            "Natural Instructions task file, pass the directory holding tasks/ and splits/.",
        )


def _first_record(path: Path) -> dict[str, Any]:
    """The first record of a data file, reading only its first line when it is JSON Lines."""
    _check_file(path, "data file", "pass the path of an existing .json or .jsonl file.")
    with path.open(encoding="utf-8-sig", errors="replace") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith("["):
        return read_records(path)[0][1]
    with path.open(encoding="utf-8-sig", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                # Let the full reader produce its precise error.
                return read_records(path)[0][1]
            if not isinstance(rec, dict):
                raise DataError(
                    f"expected a JSON object, got {type(rec).__name__}.", path=path, line=lineno
                )
            return rec
    raise DataError("the file is empty.", path=path, fix="point to a file with records.")


def _field_str(
    rec: dict[str, Any],
    field: str,
    *,
    path: Path,
    line: int,
    where: str = "line",
    required: bool = True,
) -> str:
    """A string field of a record; a missing optional field or a null reads as ``""``.

    A missing field of a generic JSON file never gets here (:func:`_check_required_fields`
    reports it with the option that renames it); the fixed formats can only add the field.
    """
    if field not in rec:
        if not required:
            return ""
        raise DataError(
            f"missing required field {field!r} (fields present: {sorted(rec)}).",
            path=path,
            line=line,
            where=where,
            fix=f"add {field!r} to every record.",
        )
    value = rec[field]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(
            f"field {field!r} must be a string, got {type(value).__name__}.",
            path=path,
            line=line,
            where=where,
            fix=f"make {field!r} a string in every record.",
        )
    return _utf8(value, field, path=path, line=line, where=where)


def _utf8(value: str, field: str, *, path: Path, line: int, where: str = "line") -> str:
    """``value``, when it can be written as UTF-8: JSON's ``\\ud800``-style escapes can decode to
    unpaired surrogates, which would fail much later (hashing ids, tokenizing) without a line."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(
            f"field {field!r} holds an unpaired surrogate ({value[exc.start]!r}), which is not text.",
            path=path,
            line=line,
            where=where,
            fix="write the text as UTF-8 (or as a paired \\ud83d\\ude00-style escape).",
        ) from exc
    return value


def _label_str(value: Any, field: str, *, allow_int: bool, path: Path, line: int, where: str = "line") -> str:
    """A record's task name or id: a non-empty string, or (for ids) an int; never a stringified
    null, bool, list or object, which would silently become a task called 'None' or "['a']"."""
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        kind = "a non-empty string" + (" or an int" if allow_int else "")
        raise DataError(
            f"field {field!r} must be {kind}, got {value!r}.",
            path=path,
            line=line,
            where=where,
            fix=f"give every record a {field!r} that names it.",
        )
    return _utf8(value, field, path=path, line=line, where=where)


def _references(
    value: Any, *, field: str, path: Path, line: int, where: str = "line"
) -> tuple[str, ...]:
    """Normalise an answer field that may be one string or a list of acceptable strings."""
    if isinstance(value, str):
        return (_utf8(value, field, path=path, line=line, where=where),)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(_utf8(v, field, path=path, line=line, where=where) for v in value)
    if isinstance(value, list) and not value:
        raise DataError(
            f"field {field!r} is an empty list; there is no reference answer.",
            path=path,
            line=line,
            where=where,
            fix="give at least one reference string, or remove the record.",
        )
    raise DataError(
        f"field {field!r} must be a string or a list of strings, got {type(value).__name__}.",
        path=path,
        line=line,
        where=where,
    )


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


# -- Natural Instructions ----------------------------------------------------------------


def _read_split_file(path: Path) -> list[tuple[int, str]]:
    _check_file(
        path,
        "split file",
        "Natural Instructions needs splits/<split>/train_tasks.txt and test_tasks.txt "
        "(one task name per line; an empty test_tasks.txt means no unseen tasks).",
    )
    names: list[tuple[int, str]] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(_read_text(path).splitlines(), start=1):
        name = raw.strip()
        if not name or name.startswith("#"):
            continue
        if name.endswith(".json"):
            name = name[: -len(".json")]
        if name in seen:
            continue
        seen.add(name)
        names.append((lineno, name))
    return names


def _ni_instruction(
    task_doc: dict[str, Any], *, path: Path, definition: bool, num_positive_examples: int
) -> str:
    parts: list[str] = []
    if definition:
        value = task_doc["Definition"]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(
                "'Definition' must be a string or a list of strings.",
                path=path,
                fix="use the upstream schema: a list of definition strings.",
            )
        # A few upstream tasks give two phrasings of their definition; keep both.
        parts.append(" ".join(v.strip() for v in value if v.strip()))
    if num_positive_examples > 0:
        positives = task_doc.get("Positive Examples") or []
        if not isinstance(positives, list):
            raise DataError("'Positive Examples' must be a list.", path=path)
        shots = []
        for i, ex in enumerate(positives[:num_positive_examples], start=1):
            if not isinstance(ex, dict) or "input" not in ex or "output" not in ex:
                raise DataError(
                    f"positive example {i} lacks 'input' or 'output'.",
                    path=path,
                    fix="repair the task file, or pass num_positive_examples=0.",
                )
            out = ex["output"]
            if isinstance(out, list):
                out = out[0] if out else ""
            shots.append(f"Positive Example {i}-\nInput: {ex['input']}\nOutput: {out}")
        parts.extend(shots)
    return "\n\n".join(parts)


def _load_ni_task(
    path: Path,
    task: str,
    *,
    definition: bool,
    num_positive_examples: int,
    max_per_task: int | None,
) -> list[Example]:
    doc = _load_json_document(path)
    if not isinstance(doc, dict):
        raise DataError(
            f"a task file must hold one JSON object, got {type(doc).__name__}.", path=path
        )
    for key in ("Definition", "Instances"):
        if key not in doc:
            raise DataError(
                f"missing required field {key!r}.",
                path=path,
                fix="use the upstream Natural Instructions task schema "
                "(Definition, Positive Examples, Instances, ...).",
            )
    instances = doc["Instances"]
    if not isinstance(instances, list):
        raise DataError("'Instances' must be a list.", path=path)
    instruction = _ni_instruction(
        doc, path=path, definition=definition, num_positive_examples=num_positive_examples
    )
    examples: list[Example] = []
    for i, inst in enumerate(instances, start=1):
        if max_per_task is not None and len(examples) >= max_per_task:
            break
        if not isinstance(inst, dict):
            raise DataError(
                f"an instance must be a JSON object, got {type(inst).__name__}.",
                path=path,
                line=i,
                where="instance",
            )
        text = _field_str(inst, "input", path=path, line=i, where="instance")
        if "output" not in inst:
            raise DataError(
                "missing required field 'output'.",
                path=path,
                line=i,
                where="instance",
                fix="give every instance an 'output' list of reference answers.",
            )
        refs = _references(inst["output"], field="output", path=path, line=i, where="instance")
        # Upstream instance ids ("task1146-<hex>") are unique across the collection; old
        # task files without ids fall back to the task name and the instance position.
        raw_id = inst.get("id")
        ex_id = (_label_str(raw_id, "id", allow_int=True, path=path, line=i, where="instance") if raw_id not in (None, "")
                 else f"{task}-{i}")
        examples.append(
            Example(
                id=ex_id,
                instruction=instruction,
                input=text,
                output=refs[0],
                task=task,
                references=refs,
            )
        )
    return examples


def load_natural_instructions(
    root: str | os.PathLike[str],
    *,
    split: str = "default",
    max_per_task: int | None = None,
    min_per_task: int = 1,
    definition: bool = True,
    num_positive_examples: int = 0,
    unseen_tasks: Sequence[str] | None = None,
    unseen_only: bool = False,
) -> TaskData:
    """Load Natural Instructions v2 in the upstream layout; one task is one client.

    Parameters
    ----------
    root : str or PathLike
        Directory holding ``tasks/<task>.json`` and ``splits/<split>/train_tasks.txt`` and
        ``test_tasks.txt``. Task files not named by either split file are ignored.
    split : str, default "default"
        Sub-directory of ``splits/``.
    max_per_task : int or None, default None
        Keep only the first ``max_per_task`` instances of each task (upstream order).
    min_per_task : int, default 1
        Drop tasks with fewer instances than this (logged at INFO level).
    definition : bool, default True
        Use the task's ``Definition`` (its strings joined by a space) as the instruction.
        With ``False`` and no positive examples the instruction is ``""``.
    num_positive_examples : int, default 0
        Append this many of the task's ``Positive Examples`` to the instruction as
        demonstrations (``"Positive Example i-\\nInput: ...\\nOutput: ..."``).
    unseen_tasks : sequence of str or None, default None
        ``None``: the test-split tasks are the unseen tasks. Otherwise exactly these tasks
        (each listed in one of the two split files) are unseen, in the given order, and
        every other listed task is a train task.
    unseen_only : bool, default False
        Load only the unseen tasks and leave ``train`` empty (no train task is then needed):
        what an evaluation-only data set needs, without reading the train tasks' files.

    Returns
    -------
    TaskData
        ``train``: the train-split tasks; ``unseen``: the test-split tasks (zero-shot). Tasks
        keep the split files' order and instances keep the task files' order. ``input`` is
        the instance input, ``references`` the instance's ``output`` list and ``output`` its
        first element. Ids are the upstream instance ids.

    Raises
    ------
    DataError
        Missing directory or split file; a split file naming a task with no task file (with
        the split file's line); malformed task JSON (with its line); a task or instance
        missing a required field (with the instance number); a task in both splits; or no
        train task left (with ``unseen_only``: no unseen task left).
    """
    _check_max_per_task(max_per_task)
    if min_per_task < 0:
        raise DataError(f"min_per_task must be >= 0, got {min_per_task}.")
    if num_positive_examples < 0:
        raise DataError(f"num_positive_examples must be >= 0, got {num_positive_examples}.")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(
            "Natural Instructions directory does not exist.",
            path=base,
            fix="pass the directory that holds tasks/ and splits/.",
        )
    tasks_dir = base / "tasks"
    if not tasks_dir.is_dir():
        raise DataError(
            "no tasks/ directory here.",
            path=base,
            fix="pass the directory that holds tasks/<task>.json and splits/.",
        )
    split_dir = base / "splits" / split
    train_file = split_dir / "train_tasks.txt"
    test_file = split_dir / "test_tasks.txt"
    train_names = _read_split_file(train_file)
    test_names = _read_split_file(test_file)
    test_lines = {name: line for line, name in test_names}
    for line, name in train_names:
        if name in test_lines:
            raise DataError(
                f"task {name!r} is listed in both splits (also {test_file}, "
                f"line {test_lines[name]}).",
                path=train_file,
                line=line,
                fix="list each task in only one split.",
            )

    listed = [(line, name, train_file) for line, name in train_names] + [
        (line, name, test_file) for line, name in test_names
    ]
    if unseen_tasks is None:
        train_side = listed[: len(train_names)]
        unseen_side = listed[len(train_names) :]
    else:
        if isinstance(unseen_tasks, str):
            unseen_tasks = (unseen_tasks,)
        wanted = list(dict.fromkeys(unseen_tasks))
        by_name = {entry[1]: entry for entry in listed}
        unknown = [t for t in wanted if t not in by_name]
        if unknown:
            raise DataError(
                f"unseen tasks {unknown[:5]} are listed in neither split file.",
                path=split_dir,
                fix="name tasks from train_tasks.txt or test_tasks.txt.",
            )
        train_side = [e for e in listed if e[1] not in wanted]
        unseen_side = [by_name[t] for t in wanted]

    def load_side(names: list[tuple[int, str, Path]]) -> dict[str, list[Example]]:
        groups: dict[str, list[Example]] = {}
        for line, name, split_file in names:
            task_path = tasks_dir / f"{name}.json"
            if not task_path.is_file():
                raise DataError(
                    f"the split names task {name!r} but {task_path} does not exist.",
                    path=split_file,
                    line=line,
                    fix="add the task file or remove the line from the split file.",
                )
            examples = _load_ni_task(
                task_path,
                name,
                definition=definition,
                num_positive_examples=num_positive_examples,
                max_per_task=max_per_task,
            )
            if len(examples) < max(min_per_task, 1):
                logger.info(
                    "dropping task %s: %d instances < min_per_task=%d",
                    name,
                    len(examples),
                    min_per_task,
                )
                continue
            groups[name] = examples
        return groups

    # min_per_task is only named when it is not the default: it is a keyword of this function,
    # not a setting a command-line user has.
    check = f" (check min_per_task={min_per_task})" if min_per_task > 1 else ""
    train = {} if unseen_only else load_side(train_side)
    unseen = load_side(unseen_side)
    if unseen_only and not unseen:
        raise DataError(
            "no test task with instances was found.",
            path=test_file,
            fix=f"list at least one task file with instances in {test_file.name}{check}.",
        )
    if not train and not unseen_only:
        raise DataError(
            "no train task with instances was found.",
            path=train_file,
            fix=f"list at least one task file with instances{check}.",
        )
    opts = [f"split={split}"]
    if max_per_task is not None:
        opts.append(f"max_per_task={max_per_task}")
    if min_per_task != 1:
        opts.append(f"min_per_task={min_per_task}")
    if not definition:
        opts.append("definition=False")
    if num_positive_examples:
        opts.append(f"num_positive_examples={num_positive_examples}")
    if unseen_tasks is not None:
        opts.append(f"unseen={list(unseen)}")
    if unseen_only:
        opts.append("unseen_only=True")
    return TaskData(
        train=train, unseen=unseen, name=f"natural-instructions:{base} ({', '.join(opts)})"
    )


# -- Dolly -------------------------------------------------------------------------------


def _fetch_dolly_from_hub() -> Path:
    fix = (
        "download databricks-dolly-15k.jsonl once and pass its local path "
        "(e.g. ../shared/data/dolly-15k/databricks-dolly-15k.jsonl)."
    )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise DataError(
            f"{DOLLY_HUB_NAME!r} is not a local path and huggingface_hub is not installed.",
            fix=fix,
        ) from exc
    try:
        return Path(
            hf_hub_download(
                repo_id=DOLLY_HUB_NAME, repo_type="dataset", filename=DOLLY_HUB_FILENAME
            )
        )
    except Exception as exc:  # noqa: BLE001 - offline, auth, missing file: all need the same fix
        raise DataError(
            f"could not download {DOLLY_HUB_NAME!r} from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}).",
            fix=fix,
        ) from exc


def load_dolly(
    path_or_name: str | os.PathLike[str] = DOLLY_HUB_NAME,
    *,
    unseen_categories: Sequence[str] = DOLLY_DEFAULT_UNSEEN,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    max_per_task: int | None = None,
) -> TaskData:
    """Load Dolly-15k; one category is one task.

    Parameters
    ----------
    path_or_name : str or PathLike, default "databricks/databricks-dolly-15k"
        A local JSON Lines (or JSON list) file with ``instruction``, ``context``,
        ``response`` and ``category``. The Hub name, when no such local path exists, is
        fetched with ``huggingface_hub.hf_hub_download`` (imported only then).
    unseen_categories : sequence of str, default ("summarization", "creative_writing")
        Categories held out whole as unseen tasks for zero-shot evaluation. The default holds
        out the two smallest categories (about 13 % of the records). May be empty.
    holdout_fraction : float, default 0.1
        Only used when ``unseen_categories`` is empty: each category then holds out this
        fraction of its records (seeded, see ``seed``) and ``unseen`` maps each category
        to them, with ``unseen_kind="instances"``. ``0`` gives no evaluation split.
    seed : int, default 0
        Seed of the per-category held-out selection.
    max_per_task : int or None, default None
        Keep only the first ``max_per_task`` records of each category (file order), before
        the held-out split.

    Returns
    -------
    TaskData
        ``instruction`` <- instruction, ``input`` <- context, ``output`` <- response,
        ``task`` <- category, ids ``"dolly-<line number>"`` (1-based). Categories appear in
        order of first occurrence.

    Raises
    ------
    DataError
        Missing file (or the Hub name while offline), malformed line, missing field, empty
        file, or an unknown category in ``unseen_categories``.
    """
    _check_max_per_task(max_per_task)
    _check_fraction(holdout_fraction)
    path = Path(path_or_name).expanduser()
    if not path.exists():
        if str(path_or_name) == DOLLY_HUB_NAME:
            path = _fetch_dolly_from_hub()
        else:
            raise DataError(
                "Dolly file does not exist.",
                path=path,
                fix=f"pass the path of databricks-dolly-15k.jsonl, or {DOLLY_HUB_NAME!r} "
                "to download it.",
            )
    unit, records = _read_records(path)
    groups: dict[str, list[Example]] = {}
    for line, rec in records:
        at = {"path": path, "line": line, "where": unit}
        category = _field_str(rec, "category", **at)
        if not category.strip():
            raise DataError("field 'category' is empty.", **at)
        groups.setdefault(category, []).append(
            Example(
                id=f"dolly-{line}",
                instruction=_field_str(rec, "instruction", **at),
                input=_field_str(rec, "context", required=False, **at),
                output=_field_str(rec, "response", **at),
                task=category,
            )
        )
    _truncate(groups, max_per_task)
    train, unseen, kind = _split_unseen(
        groups,
        unseen_categories,
        holdout_fraction=holdout_fraction,
        seed=seed,
        source=path,
        kind="categories",
    )
    if kind == "tasks":
        desc = f"unseen={sorted(unseen)}"
    else:
        desc = f"holdout_fraction={holdout_fraction}, seed={seed}"
    if max_per_task is not None:
        desc += f", max_per_task={max_per_task}"
    return TaskData(train=train, unseen=unseen, name=f"dolly:{path} ({desc})", unseen_kind=kind)


# -- generic JSON / JSONL ----------------------------------------------------------------


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
        task's records instead (``unseen_kind="instances"``; see :func:`load_dolly`).
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


# -- dispatch ----------------------------------------------------------------------------

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
