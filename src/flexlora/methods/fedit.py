"""FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
ICASSP 2024, arXiv 2305.05644): FedAvg of the LoRA factors ``A`` and ``B``, AdamW locally.

Every client trains at the same ranks (averaging factors entrywise needs equal shapes) and starts
each round from the same global factors; in round 1 from the round's one shared fresh adapter.
``aggregator = "fedavg"`` is the same server; the paper's FedAvg trains with SGD
(``train.optimizer = "sgd"``).
"""

from __future__ import annotations

from typing import Any

from flexlora.core.aggregators import FedAvg
from flexlora.methods.lora import LoRAMethod


class FedIT(LoRAMethod):
    """FedAvg of LoRA factors at one common rank (see the module docstring)."""

    name = "fedit"
    aggregator_class = FedAvg
    averages_factors = True

    @classmethod
    def homogeneous(cls, options: Any) -> bool:
        return True
