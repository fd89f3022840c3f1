"""Reading JSON and JSON Lines data files into records, and checking the records' fields.

Shared by every file format: :func:`read_records` (and its private form that also gives the
unit of the numbers), the file and UTF-8 checks, and the typed field readers that name the
file, the line or record number, and the fix in every :class:`DataError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flexlora.data.errors import DataError

__all__ = ["read_records"]


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

    A missing field of a generic JSON file never gets here
    (:func:`flexlora.data.jsonl._check_required_fields` reports it with the option that renames
    it); the fixed formats can only add the field.
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
