"""The run's bound on each client's contribution and client-level differential privacy
(``[privacy]``), shared by every LoRA method.

The bound and the noise are applied by the core aggregator's round (:mod:`flexlora.core.clipping`);
this module holds what lasts across rounds: the bound of each round (fixed, or following a
quantile of the clients' norms), the noise of each round, the privacy accounting (dp-accounting's
RDP accountant, never our own maths), the checkpointed state and the per-round metrics.

The mechanism accounted for, per round: ``m`` of the run's ``N`` clients sampled uniformly
without replacement (a fixed-size sample, so the neighbouring relation is "replace one client's
data", with ``N`` public); each sampled client's contribution clipped to norm ``C``; Gaussian
noise of std ``z C`` on the sum. Replacing one client's data moves the sum by at most ``2 C``,
so the Gaussian's noise multiplier (noise std over sensitivity) is ``z / 2``:
``SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))`` per round. An adaptive bound
under DP also releases a noisy count (sensitivity 1, noise std ``count_noise``), composed in as
``GaussianDpEvent(count_noise)``. The rounds are composed by the accountant.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flexlora.core.clipping import AdaptiveClipNorm, ClipRecord, GaussianSumNoise
from flexlora.core.lowrank import stable_seed
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
    noise_multiplier: float = setting(0.0, "Client-level differential privacy (DP-FedAvg): Gaussian noise of std "
                                      "noise_multiplier * clip_norm on each module's sum of clipped contributions, "
                                      "uniform client weights, the sum divided by the clients sampled per round. "
                                      "0 = no noise. Needs clip_norm > 0.")
    delta: float = setting(1e-5, "The delta of the (epsilon, delta) guarantee reported per round; in (0, 1), "
                           "well below 1 / num_clients.")
    target_epsilon: float = setting(0.0, "Pick noise_multiplier (dp-accounting's calibration) so that the planned "
                                    "rounds spend this epsilon at delta; 0 = use noise_multiplier as given.")
    count_noise: float = setting(0.0, "An adaptive bound under DP: std of the noise on the count of clients within the "
                                 "bound (sensitivity 1); 0 = clients per round / 20 (Andrew et al.'s choice).")
    reproducible: bool = setting(False, "Draw the DP noise and the client sampling from the run's seed, so a run "
                                 "repeats exactly (tests, benchmarks). It voids the guarantee: whoever knows the "
                                 "config can subtract the noise. Default: from the OS's secret randomness.")

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
        for key in ("noise_multiplier", "delta", "target_epsilon", "count_noise"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"config key 'privacy.{key}': must be a finite number, got {v!r}")
        if self.noise_multiplier < 0:
            raise ConfigError(f"config key 'privacy.noise_multiplier': must be >= 0, got {self.noise_multiplier!r}")
        if self.target_epsilon < 0:
            raise ConfigError(f"config key 'privacy.target_epsilon': must be > 0 (or 0: off), got {self.target_epsilon!r}")
        if self.count_noise < 0:
            raise ConfigError(f"config key 'privacy.count_noise': must be >= 0, got {self.count_noise!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"config key 'privacy.delta': must be in (0, 1), got {self.delta!r}")
        if self.noise_multiplier and self.target_epsilon:
            raise ConfigError("config keys 'privacy.noise_multiplier' and 'privacy.target_epsilon': give one of them "
                              "(the target picks the noise multiplier)")
        if self.dp and not self.clip_norm:
            raise ConfigError("config key 'privacy.clip_norm': differential privacy needs a bound on each client's "
                              "contribution (the noise is calibrated to it); set privacy.clip_norm > 0")

    @property
    def enabled(self) -> bool:
        return self.clip_norm > 0

    @property
    def dp(self) -> bool:
        """Whether the run adds differential-privacy noise."""
        return self.noise_multiplier > 0 or self.target_epsilon > 0


def _dp_accounting() -> Any:
    try:
        import dp_accounting
    except ImportError as exc:  # a dependency of flexlora; only a broken install lacks it
        raise ConfigError("privacy.noise_multiplier needs the dp-accounting package (pip install dp-accounting)") \
            from exc
    return dp_accounting


def round_event(noise_multiplier: float, sampled: int, population: int, count_noise: float = 0.0) -> Any:
    """dp-accounting's event for one round (module docstring): ``sampled`` of ``population``
    clients without replacement, the clipped sum with noise ``noise_multiplier * C`` (sensitivity
    ``2 C`` under replace-one), and, with ``count_noise``, the adaptive bound's noisy count."""
    dpa = _dp_accounting()
    inner = dpa.GaussianDpEvent(noise_multiplier / 2.0)
    if count_noise > 0:
        inner = dpa.ComposedDpEvent([inner, dpa.GaussianDpEvent(count_noise)])
    return dpa.SampledWithoutReplacementDpEvent(population, sampled, inner)


def epsilon_of(rounds: Sequence[tuple[float, int, int, float]], delta: float) -> float:
    """The epsilon at ``delta`` of the composition of ``rounds``, each ``(noise_multiplier,
    sampled, population, count_noise)`` (RDP accountant, replace-one relation)."""
    dpa = _dp_accounting()
    acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    for z, m, n, cn in rounds:
        acc.compose(round_event(z, m, n, cn))
    return float(acc.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, delta: float, rounds: int, sampled: int, population: int,
                      count_noise: float = 0.0) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds spend at most ``target_epsilon`` at
    ``delta`` (dp-accounting's calibration)."""
    dpa = _dp_accounting()
    from dp_accounting import mechanism_calibration as mc

    def event(z: float) -> Any:
        return dpa.SelfComposedDpEvent(round_event(z, sampled, population, count_noise), rounds)

    floor = epsilon_of([(1e4, sampled, population, count_noise)] * rounds, delta)
    if floor >= target_epsilon:
        # Only the adaptive bound's noisy count can spend this much whatever the noise on the sum.
        raise ConfigError(f"config key 'privacy.target_epsilon': {target_epsilon:g} cannot be met in {rounds} rounds "
                          f"of {sampled} of {population} clients: the adaptive bound's noisy count alone (noise "
                          f"{count_noise:g}) spends epsilon {floor:.3g}; raise privacy.count_noise, or use a fixed "
                          "bound (privacy.adaptive_quantile = 0)")
    if epsilon_of([(1e-3, sampled, population, count_noise)] * rounds, delta) <= target_epsilon:
        raise ConfigError(f"config key 'privacy.target_epsilon': {target_epsilon:g} is met by any noise multiplier "
                          "down to 0.001 (no privacy to speak of); give privacy.noise_multiplier directly")
    return float(mc.calibrate_dp_mechanism(
        lambda: dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE), event,
        target_epsilon, delta, mc.ExplicitBracketInterval(1e-3, 1e4)))


class ContributionBound:
    """The bound and the noise of each round of a run, from its :class:`PrivacyOptions`.

    Parameters
    ----------
    options : PrivacyOptions or None
        None: no bound, no noise.
    population : int
        The run's number of clients ``N``.
    sampled : int
        The clients sampled per round ``m``.
    rounds : int
        The planned rounds (for ``target_epsilon``).
    seed : int
        The run's seed (the noise's, with ``reproducible``).
    """

    def __init__(self, options: PrivacyOptions | None, population: int = 1, sampled: int = 1, rounds: int = 1,
                 seed: int = 0) -> None:
        self.options = options if options is not None else PrivacyOptions()
        o = self.options
        self.population, self.sampled, self.seed = int(population), int(sampled), int(seed)
        self.count_noise = (o.count_noise or sampled / 20.0) if o.dp and o.adaptive_quantile else 0.0
        self.adaptive = AdaptiveClipNorm(o.clip_norm, o.adaptive_quantile, o.adaptive_lr, self.count_noise) \
            if o.enabled and o.adaptive_quantile else None
        self.noise_multiplier = 0.0
        if o.dp:
            self.noise_multiplier = o.noise_multiplier or noise_for_epsilon(
                o.target_epsilon, o.delta, rounds, self.sampled, self.population, self.count_noise)
        # (noise multiplier, sampled, population, count noise) of every round released so far.
        self.ledger: list[tuple[float, int, int, float]] = []

    @property
    def enabled(self) -> bool:
        return self.options.enabled

    @property
    def dp(self) -> bool:
        return self.options.dp

    def current(self) -> float | None:
        """This round's bound."""
        if not self.enabled:
            return None
        return self.adaptive.bound if self.adaptive is not None else float(self.options.clip_norm)

    def noise(self, rnd: int, sampled: int) -> GaussianSumNoise | None:
        """This round's noise for ``sampled`` clients (None without DP)."""
        if not self.dp:
            return None
        bound = self.current()
        assert bound is not None
        seed = stable_seed("dp", self.seed, rnd) if self.options.reproducible else secrets.randbits(63)
        return GaussianSumNoise(std=self.noise_multiplier * bound, clients=sampled, seed=seed)

    def notes(self) -> list[str]:
        """Start-up lines that say what the run's privacy settings do."""
        o = self.options
        if not self.enabled:
            return []
        kind = (f"adaptive (towards the {o.adaptive_quantile:g} quantile of the norms, from {o.clip_norm:g})"
                if self.adaptive is not None else f"{o.clip_norm:g}")
        out = [f"privacy: each client's contribution is bounded in norm by {kind}"]
        if self.dp:
            out.append(f"privacy: client-level DP with noise multiplier {self.noise_multiplier:.4g} "
                       f"({'from target epsilon ' + format(o.target_epsilon, 'g') if o.target_epsilon else 'as given'}), "
                       f"{self.sampled} of {self.population} clients per round, delta {o.delta:g}; the clients weigh "
                       "the same (data-size weights would leak each client's size and break the sensitivity "
                       "bound)" + ("; NOT PRIVATE: privacy.reproducible draws the noise from the config's seed"
                                   if o.reproducible else ""))
        return out

    def after_round(self, log: Sequence[ClipRecord], sampled: int | None = None) -> dict[str, Any]:
        """The round's record entries (the bound, each client's norm and whether it was clipped,
        the epsilon spent so far under DP); moves an adaptive bound for the next round."""
        if not self.enabled:
            return {}
        out: dict[str, Any] = {"clip_norm": self.current(), "clip": {r.client: r.as_dict() for r in log}}
        if self.dp:
            m = int(sampled if sampled is not None else self.sampled)
            self.ledger.append((self.noise_multiplier, m, self.population, self.count_noise))
            out["noise_multiplier"] = self.noise_multiplier
            out["epsilon"] = epsilon_of(self.ledger, self.options.delta)
            out["delta"] = self.options.delta
        if self.adaptive is not None:
            gen = None
            if self.count_noise:
                seed = stable_seed("dp-count", self.seed, len(self.ledger)) if self.options.reproducible \
                    else secrets.randbits(63)
                gen = torch.Generator().manual_seed(seed)
            # Under DP the fraction's denominator is the round's sampled clients (public), not the
            # replies (which depend on the clients).
            denominator = int(sampled) if (self.dp and sampled is not None) else len(log)
            self.adaptive.update([r.norm for r in log], clients=denominator, generator=gen)
        return out

    def checkpoint(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.adaptive is not None:
            out["clip_bound"] = self.adaptive.state_dict()
        if self.dp:
            out["dp_ledger"] = [list(x) for x in self.ledger]
        return out

    def restore(self, ckpt: Mapping[str, Any]) -> None:
        if self.adaptive is not None and ckpt.get("clip_bound") is not None:
            self.adaptive.load_state_dict(ckpt["clip_bound"])
        if self.dp:
            ledger = ckpt.get("dp_ledger") or []
            try:
                self.ledger = [(float(z), int(m), int(n), float(c)) for z, m, n, c in ledger]
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"the checkpoint's privacy ledger is malformed ({exc}); delete the checkpoint "
                                  "to restart the run") from exc
            if self.ledger:
                # The noise of a resumed run stays the one it started with (its rounds were planned with it).
                self.noise_multiplier = self.ledger[-1][0]

