"""Atomic file writes shared by every layer (no dependencies beyond the standard library)."""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path`` for binary writing.

    On success it is flushed to disk and renamed over ``path`` (``os.replace`` is atomic within
    one file system, hence the same directory); on any error it is removed and ``path`` is left
    as it was. Readers see the old file or the new one, never a torn one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give outputs the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(text.encode("utf-8"))


def make_sibling_dir(target: str | os.PathLike[str], kind: str) -> Path:
    """Create a fresh, uniquely named directory next to ``target`` and return it.

    Same parent, so a final rename onto ``target`` stays within one file system and is atomic.
    Not ``tempfile.mkdtemp``: its 0o700 mode would survive the rename and make a directory shared
    between users unreadable; ``os.mkdir`` honours the umask instead.
    """
    target = Path(target)
    for _ in range(100):
        path = target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"could not create a temporary directory next to {target}")
