"""Federated methods: one object per method behind the protocol of :class:`Method`.

A method is one file and one registration (:func:`register_method`); the orchestration, the
engines and the Flower wire never name a method. The built-in ones:

- ``fedit`` (also ``fedavg``): :mod:`flexlora.methods.fedit`
- ``flexlora``: :mod:`flexlora.methods.flexlora`
- ``hetlora``: :mod:`flexlora.methods.hetlora`
- ``flora``: :mod:`flexlora.methods.flora`
- ``slora``: :mod:`flexlora.methods.slora`
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flexlora.methods.base import (
    ClientContext,
    ClientReply,
    Method,
    MethodFold,
    NoOptions,
    ReplyError,
    RunInfo,
    StateError,
    options_of,
    pack_factors,
    rank_summary,
    tensor_bytes,
    unpack_factors,
)
from flexlora.methods.fedit import FedIT
from flexlora.methods.flexlora import FlexLoRA
from flexlora.methods.flora import FLoRA
from flexlora.methods.hetlora import HetLoRA
from flexlora.methods.lora import LoRAMethod
from flexlora.methods.slora import SLoRA
from flexlora.settings import ConfigError

_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method], *aliases: str) -> type[Method]:
    """Make ``cls`` available as ``aggregator = cls.name`` (and each alias); returns ``cls``.

    Raises
    ------
    ValueError
        For a name already taken by another class, or a class without a name.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    for n in (cls.name, *aliases):
        key = n.lower()
        if _METHODS.get(key, cls) is not cls:
            raise ValueError(f"method name {n!r} is already registered to {_METHODS[key].__name__}")
        _METHODS[key] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove the registration ``name`` (for tests that register a method of their own)."""
    _METHODS.pop(name.lower(), None)


def available_methods() -> list[str]:
    """The registered method names (aliases included)."""
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    """The method class registered as ``name`` (case and spaces ignored).

    Raises
    ------
    ConfigError
        For an unknown name; the message lists the known ones.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _METHODS:
        raise ConfigError(f"config key 'aggregator': unknown aggregator {name!r}; choose one of "
                          f"{tuple(available_methods())}")
    return _METHODS[key]


def hetero_methods() -> list[str]:
    """The registered methods that serve clients of different ranks (at their default settings)."""
    return [n for n in available_methods() if n == method_class(n).name
            and not method_class(n).homogeneous(method_class(n).Options())]


def build_method(name: str, options: Mapping[str, Any], run: RunInfo) -> Method:
    """The method ``name`` of a run, from its options sections (``{section: options}``)."""
    return method_class(name).create(options, run)


register_method(FedIT, "fedavg")
register_method(FlexLoRA)
register_method(HetLoRA)
register_method(FLoRA)
register_method(SLoRA)

__all__ = [
    "ClientContext", "ClientReply", "ConfigError", "FLoRA", "FedIT", "FlexLoRA", "HetLoRA", "LoRAMethod", "Method",
    "MethodFold", "NoOptions", "ReplyError", "RunInfo", "SLoRA", "StateError", "available_methods", "build_method",
    "hetero_methods", "method_class", "options_of", "pack_factors", "rank_summary", "register_method", "tensor_bytes",
    "unpack_factors", "unregister_method",
]
