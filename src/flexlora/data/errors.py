"""The one exception type of the data layer."""

from __future__ import annotations

from os import PathLike


class DataError(ValueError):
    """Bad or missing data, or a request the data layer cannot satisfy.

    The message names the file and the line or record number when there is one, says what
    is wrong, and says how to fix it. It subclasses ``ValueError`` so callers that catch bad
    input generically still catch it.

    Parameters
    ----------
    problem : str
        What is wrong.
    path : str or PathLike or None, default None
        The file (or directory) concerned.
    line : int or None, default None
        1-based line number (JSONL) or record number (JSON list, task instance).
    fix : str or None, default None
        How to fix it.
    where : str, default "line"
        The word printed before ``line`` ("line", "record", "instance", ...).
    """

    def __init__(
        self,
        problem: str,
        *,
        path: str | PathLike[str] | None = None,
        line: int | None = None,
        fix: str | None = None,
        where: str = "line",
    ) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        self.line = line
        self.fix = fix
        location = ""
        if self.path is not None:
            location = self.path
            if line is not None:
                location += f", {where} {line}"
            location += ": "
        message = f"{location}{problem}"
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)
