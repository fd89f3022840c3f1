"""Small private helpers shared by the data modules."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def derive_seed(*parts: object) -> int:
    """A 64-bit seed derived from ``parts`` that is the same on every run and platform.

    Python's ``hash()`` of a string is salted per process, so it must never seed anything
    that has to be reproducible; sha256 of the parts' text is used instead.
    """
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half.

    The text goes to a temporary file in the same directory (``os.replace`` is only atomic
    within one file system), is flushed to disk, and then replaces ``path``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
