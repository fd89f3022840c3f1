"""Dolly-15k (``databricks/databricks-dolly-15k``): a local JSON Lines file or the Hub data
set, with its fixed fields (``instruction``, ``context``, ``response``, ``category``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from flexlora.data.errors import DataError
from flexlora.data.examples import Example, TaskData
from flexlora.data.holdout import _check_fraction, _check_max_per_task, _split_unseen, _truncate
from flexlora.data.records import _field_str, _read_records

__all__ = [
    "DOLLY_CATEGORIES",
    "DOLLY_DEFAULT_UNSEEN",
    "DOLLY_FIELDS",
    "DOLLY_HUB_FILENAME",
    "DOLLY_HUB_NAME",
    "load_dolly",
]

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
