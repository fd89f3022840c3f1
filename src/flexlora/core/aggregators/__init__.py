"""Aggregators: one per file, each naming its paper. Use :func:`get_aggregator` to build one."""

from __future__ import annotations

import inspect
from typing import Any

from flexlora.core.aggregators.base import Aggregator, GlobalState, ModuleState, dense_update
from flexlora.core.aggregators.fedavg import FedAvg
from flexlora.core.aggregators.flexlora import FlexLoRA
from flexlora.core.aggregators.flora import FLoRA
from flexlora.core.aggregators.hetlora import HetLoRA, pruned_ranks, rank_pruning_penalty
from flexlora.core.types import AggregationError

_REGISTRY: dict[str, type[Aggregator]] = {
    "flexlora": FlexLoRA,
    "fedavg": FedAvg,
    "fedit": FedAvg,  # FedIT is FedAvg of LoRA factors with AdamW locally; the server side is the same
    "hetlora": HetLoRA,
    "flora": FLoRA,
}


def available_aggregators() -> list[str]:
    """Names accepted by :func:`get_aggregator`."""
    return sorted(_REGISTRY)


def _registered(name: str) -> tuple[str, type[Aggregator]]:
    """The registry key and class of ``name`` (case and surrounding spaces ignored)."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise AggregationError(f"unknown aggregator {name!r}; choose one of {available_aggregators()}")
    return key, _REGISTRY[key]


def averages_factors(name: str) -> bool:
    """Whether the aggregator called ``name`` averages the clients' factors ``A`` and ``B`` separately
    (so every client of a round must start from the same ``A``), rather than their products.

    Raises
    ------
    AggregationError
        For an unknown name.
    """
    return _registered(name)[1].averages_factors


def get_aggregator(name: str, **kwargs: Any) -> Aggregator:
    """Build the aggregator called ``name`` with its keyword settings.

    Raises
    ------
    AggregationError
        For an unknown name (the message lists the known ones) or an unknown setting.
    """
    key, cls = _registered(name)
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise AggregationError(
            f"aggregator {key!r} has no setting {', '.join(repr(u) for u in unknown)}; its settings are "
            f"{', '.join(accepted)}"
        )
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise AggregationError(f"aggregator {key!r}: {exc}") from exc


__all__ = [
    "Aggregator",
    "AggregationError",
    "FLoRA",
    "FedAvg",
    "FlexLoRA",
    "GlobalState",
    "HetLoRA",
    "ModuleState",
    "available_aggregators",
    "averages_factors",
    "dense_update",
    "get_aggregator",
    "pruned_ranks",
    "rank_pruning_penalty",
]
