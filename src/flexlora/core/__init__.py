"""Pure tensor maths of federated LoRA: client updates, aggregators, low-rank SVD of sums of
products, and client resource distributions. Imports torch and numpy only."""

from flexlora.core.aggregators import (
    Aggregator,
    FedAvg,
    FlexLoRA,
    FLoRA,
    GlobalState,
    HetLoRA,
    ModuleState,
    available_aggregators,
    averages_factors,
    dense_update,
    get_aggregator,
    pruned_ranks,
    rank_pruning_penalty,
)
from flexlora.core.distributions import (
    PAPER_CLIENT_TYPES,
    ClientType,
    available_distributions,
    distribution_probabilities,
    module_group,
    sample_client_types,
    types_from_budget,
    types_from_ranks,
)
from flexlora.core.types import AggregationError, ClientUpdate, lora_scaling

__all__ = [
    "PAPER_CLIENT_TYPES",
    "AggregationError",
    "Aggregator",
    "ClientType",
    "ClientUpdate",
    "FLoRA",
    "FedAvg",
    "FlexLoRA",
    "GlobalState",
    "HetLoRA",
    "ModuleState",
    "available_aggregators",
    "averages_factors",
    "available_distributions",
    "dense_update",
    "distribution_probabilities",
    "get_aggregator",
    "lora_scaling",
    "module_group",
    "pruned_ranks",
    "rank_pruning_penalty",
    "sample_client_types",
    "types_from_budget",
    "types_from_ranks",
]
