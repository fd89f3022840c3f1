"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024, arXiv 2409.05976): the server stacks the clients' factors
(an exact sum of their products) and every client merges the accumulated global update into its
base weights, then trains a fresh LoRA each round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flexlora.core.aggregators import FLoRA as FLoRAAggregator
from flexlora.core.types import Factors
from flexlora.methods.base import pack_factors
from flexlora.methods.lora import LoRAMethod
from flexlora.settings import CheckedSection, setting
from flexlora.training.client import ClientSpec


@dataclass
class FLoRAOptions(CheckedSection):
    """FLoRA's server settings (``[flora]``)."""

    key_prefix = "flora."

    accumulate: bool = setting(True, "Add each round's stacked increment to the global update (FLoRA's protocol, "
                               "clients start a fresh LoRA every round); false keeps only the round's own stack.")


def merge_precision_note(name: str, dtype: str) -> list[str]:
    """The start-up warning of a method that adds the global update to half-precision base weights."""
    if dtype == "float32":
        return []
    return [f"warning: {name} adds the global update to the {dtype} base weights, so it is kept only to {dtype}'s "
            f"precision relative to each weight (about {'0.4' if dtype == 'bfloat16' else '0.05'}%); dtype=float32 "
            "keeps it exactly"]


class FLoRA(LoRAMethod):
    """Stacking aggregation; the clients train on ``W0 + global`` with a fresh LoRA."""

    name = "flora"
    Options = FLoRAOptions
    aggregator_class = FLoRAAggregator

    def notes(self) -> list[str]:
        return [*merge_precision_note(self.name, self.run.dtype), *super().notes()]

    def stacked(self) -> dict[str, Factors]:
        assert self.state is not None
        return self.aggregator.stacked(self.state, self.run.alpha, rslora=self.run.rslora)  # type: ignore[attr-defined]

    def shared_tensors(self, rnd: int) -> dict[str, torch.Tensor]:
        # The exact global update, merged into the base by every client while it trains.
        return pack_factors(self.stacked(), "base/") if self.state is not None else {}

    def initial_factors(self, spec: ClientSpec) -> None:
        return None  # a fresh adapter every round

    def exact_factors(self) -> dict[str, Factors]:
        return self.stacked()

    def type_factors(self, ranks: Any, alpha: float) -> None:
        return None  # FLoRA clients receive the full global, not a truncated adapter
