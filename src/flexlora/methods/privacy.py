"""The run's bound on each client's contribution (``[privacy]``), shared by every LoRA method.

The bound itself is applied by the core aggregator's round (:mod:`flexlora.core.clipping`); this
module holds what lasts across rounds: the bound of each round (fixed, or following a quantile of
the clients' norms), its checkpointed state and the per-round metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flexlora.core.clipping import AdaptiveClipNorm, ClipRecord
from flexlora.settings import ConfigError, setting


@dataclass
class PrivacyOptions:
    """Bounds on each client's contribution to the global update (``[privacy]``)."""

    clip_norm: float = setting(0.0, "Bound on each sampled client's contribution, over all modules together: the "
                               "Frobenius norm of its change of s B A from what it was sent (flexlora, flora), or of "
                               "its factor change (fedit, hetlora); a contribution above it is scaled down to it. "
                               "0 = no bound. With adaptive_quantile: the first round's bound.")
    adaptive_quantile: float = setting(0.0, "Move the bound each round towards this quantile of the clients' norms "
                                       "(Andrew et al., NeurIPS 2021: C <- C exp(-adaptive_lr (fraction within C - "
                                       "quantile))); 0 = keep clip_norm fixed.")
    adaptive_lr: float = setting(0.2, "Geometric learning rate of the adaptive bound.")

    def check(self) -> None:
        """Refuse values outside their ranges, naming the key."""
        for key, v in (("clip_norm", self.clip_norm), ("adaptive_quantile", self.adaptive_quantile),
                       ("adaptive_lr", self.adaptive_lr)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"config key 'privacy.{key}': must be a finite number, got {v!r}")
        if self.clip_norm < 0:
            raise ConfigError(f"config key 'privacy.clip_norm': must be > 0 (or 0: no bound), got {self.clip_norm!r}")
        if not 0 <= self.adaptive_quantile < 1:
            raise ConfigError("config key 'privacy.adaptive_quantile': must be in (0, 1) (or 0: a fixed bound), got "
                              f"{self.adaptive_quantile!r}")
        if self.adaptive_quantile and not self.clip_norm:
            raise ConfigError("config key 'privacy.adaptive_quantile': an adaptive bound needs its first value; set "
                              "privacy.clip_norm > 0 as well")
        if not self.adaptive_lr > 0:
            raise ConfigError(f"config key 'privacy.adaptive_lr': must be > 0, got {self.adaptive_lr!r}")

    @property
    def enabled(self) -> bool:
        return self.clip_norm > 0


class ContributionBound:
    """The bound of each round of a run, from its :class:`PrivacyOptions` (None: no bound)."""

    def __init__(self, options: PrivacyOptions | None) -> None:
        self.options = options if options is not None else PrivacyOptions()
        o = self.options
        self.adaptive = AdaptiveClipNorm(o.clip_norm, o.adaptive_quantile, o.adaptive_lr) \
            if o.enabled and o.adaptive_quantile else None

    @property
    def enabled(self) -> bool:
        return self.options.enabled

    def current(self) -> float | None:
        """This round's bound."""
        if not self.enabled:
            return None
        return self.adaptive.bound if self.adaptive is not None else float(self.options.clip_norm)

    def after_round(self, log: Sequence[ClipRecord]) -> dict[str, Any]:
        """The round's record entries (the bound, each client's norm and whether it was clipped);
        moves an adaptive bound for the next round."""
        if not self.enabled:
            return {}
        out: dict[str, Any] = {"clip_norm": self.current(), "clip": {r.client: r.as_dict() for r in log}}
        if self.adaptive is not None:
            self.adaptive.update([r.norm for r in log], clients=len(log))
        return out

    def checkpoint(self) -> dict[str, Any]:
        return {"clip_bound": self.adaptive.state_dict()} if self.adaptive is not None else {}

    def restore(self, ckpt: Mapping[str, Any]) -> None:
        if self.adaptive is not None and ckpt.get("clip_bound") is not None:
            self.adaptive.load_state_dict(ckpt["clip_bound"])
