"""flexlora: federated LoRA fine-tuning with heterogeneous client ranks.

The core (``flexlora.core``) is pure tensor maths and imports only torch. Names that
need transformers/peft (``load_base_model``) are imported lazily, so ``import flexlora``
works where only torch is installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flexlora.core.aggregators import available_aggregators, dense_update, get_aggregator
from flexlora.core.distributions import (
    PAPER_CLIENT_TYPES,
    ClientType,
    available_distributions,
    sample_client_types,
    types_from_budget,
)
from flexlora.core.types import AggregationError, ClientUpdate

__version__ = "0.1.0"

__all__ = [
    "AggregationError",
    "ClientUpdate",
    "ClientType",
    "PAPER_CLIENT_TYPES",
    "available_aggregators",
    "available_distributions",
    "dense_update",
    "get_aggregator",
    "load_base_model",
    "sample_client_types",
    "types_from_budget",
]

if TYPE_CHECKING:  # pragma: no cover
    from flexlora.training.models import load_base_model


def __getattr__(name: str) -> Any:
    if name == "load_base_model":
        from flexlora.training.models import load_base_model

        return load_base_model
    raise AttributeError(f"module 'flexlora' has no attribute {name!r}")
