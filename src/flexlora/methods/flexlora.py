"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous
Tasks and Client Resources", NeurIPS 2024, arXiv 2402.11505).

Each client trains LoRA at its own rank; the server averages the full-size updates ``s_k B_k A_k``
with data-size weights and sends every client the best approximation of the average at its own
rank (truncated SVD, Eckart-Young). The core aggregator (:class:`flexlora.core.aggregators.FlexLoRA`)
does it exactly without ever forming a dense matrix; its rank-collapse remedies are options here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flexlora.core.aggregators import FlexLoRA as FlexLoRAAggregator
from flexlora.methods.lora import LoRAMethod
from flexlora.settings import CheckedSection, ConfigError, setting

_BATCH = {"cuda": None, "always": True, "never": False}


@dataclass
class FlexLoRAOptions(CheckedSection):
    """FlexLoRA's server settings (``[flexlora]``)."""

    key_prefix = "flexlora."

    max_rank: int = setting(0, "Largest rank the server keeps and distributes; 0 = the largest client rank of the run "
                            "(below it, those clients could not be sent their best approximation).")
    svd_method: str = setting("auto", "SVD of the averaged update: auto (thin QR, dense SVD near full rank), cholesky "
                              "(float64 Grams, falls back to qr), gram, qr, dense (all exact), randomized (approximate).",
                              choices=("auto", "cholesky", "gram", "qr", "dense", "randomized"))
    dense_threshold: float = setting(0.85, "svd_method='auto': use the dense SVD once the round's total rank exceeds "
                                     "this fraction of min(out, in) (measured crossover on 2 CPU cores).")
    remedy: str = setting("none", "Rank-collapse remedy: none (the paper's FlexLoRA), server-memory (keep the tail "
                          "the clients were not sent), rank-partitioned (each rank band averaged over the clients "
                          "that hold it).", choices=("none", "server-memory", "rank-partitioned"))
    split: str = setting("B", "Which distributed factor carries the singular values: B (the paper's), A or sqrt.",
                         choices=("B", "A", "sqrt"))
    stream_bound: int = setting(0, "Width of a module's running stack of factors that triggers its exact "
                                "compression while replies stream in; 0 = min(out, in).")
    batch_modules: str = setting("cuda", "Batch the thin-QR SVDs of modules of one shape: cuda (on CUDA only), "
                                 "always, never (batched results equal unbatched ones to float32 rounding).",
                                 choices=tuple(_BATCH))

    def check(self) -> None:
        if self.max_rank < 0 or isinstance(self.max_rank, bool):
            raise ConfigError(f"config key 'flexlora.max_rank': must be >= 0 (0 = the largest client rank), got "
                              f"{self.max_rank!r}")
        if not 0.0 < self.dense_threshold <= 1.0:
            raise ConfigError(f"config key 'flexlora.dense_threshold': must be in (0, 1], got {self.dense_threshold!r}")
        if self.stream_bound < 0:
            raise ConfigError(f"config key 'flexlora.stream_bound': must be >= 0 (0 = min(out, in)), got "
                              f"{self.stream_bound!r}")


class FlexLoRA(LoRAMethod):
    """Full-size weighted averaging, redistributed to each client's rank by truncated SVD."""

    name = "flexlora"
    Options = FlexLoRAOptions
    aggregator_class = FlexLoRAAggregator

    def aggregator_kwargs(self) -> dict[str, Any]:
        o = self.options
        return {"max_rank": o.max_rank or self.run.max_rank, "svd_method": o.svd_method,
                "dense_threshold": o.dense_threshold, "remedy": o.remedy, "split": o.split,
                "stream_bound": o.stream_bound or None, "batch_modules": _BATCH[o.batch_modules]}

    @classmethod
    def dp_refusal(cls, options: Any) -> str | None:
        if options.remedy == "rank-partitioned":
            return ("remedy 'rank-partitioned' averages each rank band over its own holders, so a client's share "
                    "of a band is not bounded; use remedy 'none' or 'server-memory'")
        return None

    @classmethod
    def legacy_value(cls, key: str, value: Any) -> Any:
        return _BATCH[value] if key == "batch_modules" else value

    def check_types(self) -> None:
        given, largest = self.options.max_rank, self.run.max_rank
        if given and given < largest:
            raise ConfigError(f"{self.name}.max_rank = {given} is below the largest client rank of the run "
                              f"({largest}): those clients could not be sent their best approximation; leave "
                              f"max_rank at 0 (the largest client rank, {largest}) or set it to at least that")
