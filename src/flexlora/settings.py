"""Typed settings sections: the field helper whose metadata carries the help text, the type and
choice check, and :class:`ConfigError`.

Shared by the run configuration (:mod:`flexlora.engines.config`) and the federated methods'
own option sections (:mod:`flexlora.methods`), which sit below the engines: both describe their
settings the same way, so ``flexlora config`` shows both from one place.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import field
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A configuration problem; the message names the key and says what is accepted."""


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with ``help`` (and e.g. ``choices``) in its metadata."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def fail(key: str, msg: str) -> typing.NoReturn:
    """Raise :class:`ConfigError` for ``key``."""
    raise ConfigError(f"config key '{key}': {msg}")


def check_types(obj: Any, prefix: str) -> None:
    """Check every field of the dataclass ``obj`` against its annotation and ``choices``.

    Ints given for float fields become floats; floats must be finite; a bool is not an int.
    Nested dataclass fields are checked recursively with ``prefix`` + the field name.

    Raises
    ------
    ConfigError
        Naming the key (``prefix`` + field name) and what it must be.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        want = hints[f.name]
        if dataclasses.is_dataclass(want):
            if not isinstance(value, want):
                fail(key, f"must be a table of settings, got {type(value).__name__}")
            check_types(value, key + ".")
            continue
        if want is Any:
            continue
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                fail(key, f"must be a finite number, got an int of {len(str(value))} digits")
            object.__setattr__(obj, f.name, value)
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok:
            fail(key, f"must be {want.__name__}, got {type(value).__name__} {value!r}")
        if want is float and not math.isfinite(value):
            fail(key, f"must be a finite number, got {value!r}")
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            fail(key, f"must be one of {list(choices)}, got {value!r}")


def field_default(f: dataclasses.Field) -> Any:
    """The default value of a dataclass field (its factory called when it has one)."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def non_defaults(obj: Any) -> dict[str, Any]:
    """The fields of the dataclass ``obj`` whose values differ from their defaults."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if getattr(obj, f.name) != field_default(f)}


class CheckedSection:
    """A dataclass settings section that checks itself when built: field types and choices
    (:func:`check_types`, keys named with :attr:`key_prefix`), then :meth:`check` for ranges."""

    key_prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        check_types(self, self.key_prefix)
        self.check()

    def check(self) -> None:
        """Range checks beyond the types; raise :class:`ConfigError` naming the key."""
        return None
