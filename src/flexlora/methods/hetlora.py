"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP 2024, arXiv 2401.06432): zero-padding aggregation of heterogeneous-rank factors
weighted by their update norms, a rank self-pruning regulariser on the client, and rank pruning
between rounds.

The pruning decision (a module whose tail share ``||B_tail|| ||A_tail|| / (||B|| ||A||)`` is below
``prune_threshold`` keeps ``floor(gamma r)`` ranks in the client's next rounds, never below
``min_rank``) is this project's reading of the paper (README).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flexlora.core.aggregators import HetLoRA as HetLoRAAggregator
from flexlora.core.aggregators import pruned_ranks
from flexlora.core.types import ClientUpdate
from flexlora.methods.base import StateError, rank_summary
from flexlora.methods.lora import LoRAMethod
from flexlora.settings import CheckedSection, ConfigError, setting
from flexlora.training.client import ClientSpec, ClientTask


@dataclass
class HetLoRAOptions(CheckedSection):
    """HetLoRA's settings (``[hetlora]``): the server's weighting, the client's regulariser, the pruning."""

    key_prefix = "hetlora."

    weighting: str = setting("norm", "Aggregation weights: norm (each client's module update norm, the paper's), "
                             "norm_size (norm times n_k) or size (n_k alone).", choices=("norm", "norm_size", "size"))
    strength: float = setting(1e-3, "Strength of the rank self-pruning regulariser added to each client's loss "
                              "(0 = off).")
    gamma: float = setting(0.99, "Fraction of each rank not penalised by the regulariser, and the factor a pruned "
                           "rank is multiplied by.")
    prune: bool = setting(True, "Rank self-pruning: after a round, each module of a client whose tail is small keeps "
                          "floor(gamma * r) ranks in its next rounds.")
    prune_threshold: float = setting(1e-3, "A module's rank is pruned when ||B_tail|| ||A_tail|| / (||B|| ||A||) is "
                                     "below this.")
    min_rank: int = setting(0, "Floor of the pruned ranks; 0 = the smallest rank of that module among the run's "
                            "client types.")

    def check(self) -> None:
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"config key 'hetlora.gamma': must be a fraction in (0, 1], got {self.gamma!r}")
        for key in ("strength", "min_rank", "prune_threshold"):
            v = getattr(self, key)
            if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
                raise ConfigError(f"config key 'hetlora.{key}': must be >= 0, got {v!r}")


class HetLoRA(LoRAMethod):
    """Zero-padding aggregation, the client's rank regulariser and self-pruning."""

    name = "hetlora"
    Options = HetLoRAOptions
    aggregator_class = HetLoRAAggregator
    averages_factors = True

    def __init__(self, options: Any, run: Any) -> None:
        super().__init__(options, run)
        # The self-pruned ranks: client -> per-module ranks, for the clients that pruned.
        self.pruned: dict[int, dict[str, int]] = {}

    @classmethod
    def legacy_config(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        o = options[cls.name]
        weighting = {"weighting": o.weighting} if o.weighting != "norm" else {}
        # The pruning keys came later than the regulariser's: at their defaults they were left out.
        later = {k: v for k, v, default in (("hetlora_prune", o.prune, True),
                                            ("hetlora_prune_threshold", o.prune_threshold, 1e-3),
                                            ("hetlora_min_rank", o.min_rank, 0)) if v != default}
        return {"aggregator_options": weighting,
                "train": {"hetlora_strength": o.strength, "hetlora_gamma": o.gamma, **later}}

    def client_ranks(self, k: int, ranks: dict[str, int]) -> dict[str, int]:
        return self.pruned.get(k) or ranks

    def client_meta(self, spec: ClientSpec) -> dict[str, Any]:
        o = self.options
        return {"hetlora": [o.strength, o.gamma]} if o.strength > 0 else {}

    @classmethod
    def regularizer(cls, task: ClientTask) -> tuple[float, float] | None:
        het = task.meta.get("hetlora")
        return (float(het[0]), float(het[1])) if het else None

    def decide(self, task: ClientTask, update: ClientUpdate) -> dict[str, int] | None:
        """The ranks the client trains at in its next rounds (never below the floor), or None when
        they do not change."""
        o = self.options
        if not o.prune:
            return None
        used = self.run.used_ranks()
        floor = {m: o.min_rank or min(r[m] for r in used) for m in self.run.shapes}
        old = task.spec.ranks
        keep = pruned_ranks(update.factors, gamma=o.gamma, threshold=o.prune_threshold)
        new = {m: max(min(keep[m], old[m]), min(floor[m], old[m])) for m in old}
        return new if new != old else None

    def apply_decisions(self, rnd: int, decisions: Mapping[int, tuple[ClientTask, Any]]) -> dict[str, Any]:
        pruned_now: dict[str, Any] = {}
        for k, (task, new) in decisions.items():
            self.pruned[k] = new
            cid = task.spec.client_id
            pruned_now[cid] = rank_summary(new, self.run.groups)
            self.run.log(f"round {rnd}: {cid} pruned its ranks to {pruned_now[cid]}")
        return {"pruned": pruned_now} if pruned_now else {}

    @classmethod
    def dp_refusal(cls, options: Any) -> str | None:
        return ("its weights are the norms of the clients' updates, which depend on their data, so no client's "
                "share of the average is bounded")

    def checkpoint(self) -> dict[str, Any]:
        return {**super().checkpoint(), "pruned_ranks": {str(k): dict(v) for k, v in sorted(self.pruned.items())}}

    def restore(self, ckpt: Mapping[str, Any], where: str) -> None:
        super().restore(ckpt, where)
        self.pruned = {int(k): {str(m): int(r) for m, r in v.items()} for k, v in ckpt.get("pruned_ranks", {}).items()}
        for k, ranks in self.pruned.items():
            if not 0 <= k < self.run.num_clients or set(ranks) != set(self.run.shapes) \
                    or any(r < 1 for r in ranks.values()):
                raise StateError(f"checkpoint {where}: its pruned ranks of client {k} do not fit this run; delete it "
                                 "to restart the run")
