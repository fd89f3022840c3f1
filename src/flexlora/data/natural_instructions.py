"""Natural Instructions v2 (Super-NaturalInstructions) in the upstream directory layout:
``root/tasks/<task>.json`` and ``root/splits/<split>/{train,test}_tasks.txt``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flexlora.data.errors import DataError
from flexlora.data.examples import Example, TaskData
from flexlora.data.holdout import _check_max_per_task
from flexlora.data.records import _check_file, _field_str, _label_str, _load_json_document, _read_text, _references

__all__ = ["load_natural_instructions"]

logger = logging.getLogger(__name__)


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
