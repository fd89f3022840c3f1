"""Small private helpers shared by the data modules."""

from __future__ import annotations

import hashlib

from flexlora._atomic import atomic_write_text

__all__ = ["atomic_write_text", "derive_seed"]


def derive_seed(*parts: object) -> int:
    """A 64-bit seed derived from ``parts`` that is the same on every run and platform.

    Python's ``hash()`` of a string is salted per process, so it must never seed anything
    that has to be reproducible; sha256 of the parts' text is used instead.
    """
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
