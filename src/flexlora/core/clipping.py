"""Norm bounds on each client's contribution to a round (robust aggregation, and the basis of
client-level differential privacy).

What is bounded is what the aggregator folds, measured from what the client was sent:

- aggregators of products (FlexLoRA, FLoRA) fold the full-size update ``s_k B_k A_k``; the
  client's contribution is its change ``D_k = s_k B_k A_k - s_k B0_k A0_k`` from the product it
  was sent (``T_{r_k}(G)`` for FlexLoRA; nothing, so the whole product, for a client that starts
  from a fresh adapter whose ``B`` is zero). Its Frobenius norm over all modules together is
  computed exactly from two small Gram matrices per module (:func:`product_change_norm`), never
  from a dense ``out x in`` matrix. A contribution over the bound ``C`` is scaled down to norm
  ``C``: the aggregator folds ``T + c D_k`` with ``c = C / ||D_k||``.
- aggregators of factors (FedAvg/FedIT, HetLoRA) fold ``A_k`` and ``B_k`` themselves; the
  contribution is the factor change ``(A_k - A0_k, B_k - B0_k)``, and clipping moves the factors
  back towards what was sent: ``A0 + c (A - A0)``, ``B0 + c (B - B0)``. That bounds the change of
  the averaged factors, not of their product: the product's change is at most
  ``s C (||A0|| + ||B0|| + C)`` (docs: "Private and robust aggregation").

:class:`AdaptiveClipNorm` sets the bound from the norms themselves: geometric tracking of a
quantile of the clients' norms (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private
Learning with Adaptive Clipping", NeurIPS 2021).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from flexlora.core.lowrank import stable_seed
from flexlora.core.types import AggregationError, Factors


@dataclass(frozen=True)
class ClipRecord:
    """One client's contribution norm in a round, and what the bound did to it.

    ``norm`` is the contribution's norm before clipping, ``bound`` the round's bound and
    ``factor`` the scale applied (1.0 when not clipped)."""

    client: str
    norm: float
    bound: float
    factor: float

    @property
    def clipped(self) -> bool:
        return self.factor < 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "clipped": self.clipped}


def check_clip_norm(clip_norm: Any) -> float | None:
    """``clip_norm`` as a float (None: no bound); refuses a bound that is not a positive finite number."""
    if clip_norm is None:
        return None
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, int | float) or not 0 < clip_norm < math.inf:
        raise AggregationError(f"clip_norm must be a positive finite number (the bound on each client's "
                               f"contribution) or None, got {clip_norm!r}")
    return float(clip_norm)


def product_change_norm(
    factors: Mapping[str, Factors], scales: Mapping[str, float], sent: Mapping[str, Factors] | None
) -> float:
    """The Frobenius norm, over all modules together, of ``sum_m ||s_m (B_m A_m - B0_m A0_m)||^2``.

    Computed in float64 from the Gram matrices of the stacks ``[B, -B0]`` and ``[A; A0]``:
    ``||Bs As||_F^2 = sum((Bs^T Bs) * (As As^T))``, ``(2r x 2r)`` each, so the cost is
    ``O((out + in) r^2)`` per module.

    Parameters
    ----------
    factors : mapping module -> (A, B)
        The client's returned factors.
    scales : mapping module -> float
        The client's LoRA scaling ``s`` per module (``alpha / r``, or ``alpha / sqrt(r)``).
    sent : mapping module -> (A0, B0), or None
        The factors the client was sent (at its own ranks, for its own scaling); None or a
        missing module: the client started from a zero product.
    """
    total = 0.0
    for m, (a, b) in factors.items():
        s = float(scales[m])
        a, b = a.double(), b.double()
        if sent is not None and m in sent:
            a0, b0 = sent[m]
            bs = torch.cat([b, -b0.to(b)], dim=1)
            as_ = torch.cat([a, a0.to(a)], dim=0)
        else:
            bs, as_ = b, a
        gram = float(((bs.T @ bs) * (as_ @ as_.T)).sum())
        # Cancellation can leave a tiny negative value for a change that is (almost) zero.
        total += max(gram, 0.0) * s * s
    return math.sqrt(total)


def factor_change_norm(factors: Mapping[str, Factors], sent: Mapping[str, Factors] | None) -> float:
    """The Frobenius norm of the factor change ``(A - A0, B - B0)`` over all modules together
    (float64); None or a missing module in ``sent``: the change from zero factors."""
    total = 0.0
    for m, (a, b) in factors.items():
        if sent is not None and m in sent:
            a0, b0 = sent[m]
            total += float((a.double() - a0.double()).square().sum()) + float((b.double() - b0.double()).square().sum())
        else:
            total += float(a.double().square().sum()) + float(b.double().square().sum())
    return math.sqrt(total)


def clip_factor(norm: float, bound: float | None) -> float:
    """The scale ``min(1, bound / norm)`` that brings a contribution of ``norm`` within ``bound``."""
    if bound is None or norm <= bound:
        return 1.0
    return bound / norm


def clip_factors_towards(factors: Mapping[str, Factors], sent: Mapping[str, Factors] | None,
                         c: float) -> dict[str, Factors]:
    """``(A0 + c (A - A0), B0 + c (B - B0))`` per module (zero ``A0``, ``B0`` where nothing was sent)."""
    out: dict[str, Factors] = {}
    for m, (a, b) in factors.items():
        if sent is not None and m in sent:
            a0, b0 = (t.to(device=a.device, dtype=a.dtype) for t in sent[m])
            out[m] = (a0 + c * (a - a0), b0 + c * (b - b0))
        else:
            out[m] = (c * a, c * b)
    return out


class AdaptiveClipNorm:
    """A clipping bound that follows a quantile of the clients' contribution norms.

    Geometric update of Andrew et al. (NeurIPS 2021): after a round whose clients' fraction of
    norms at or below the bound ``C`` is ``b``, ``C <- C exp(-lr (b - quantile))``. Under
    differential privacy the fraction is counted with Gaussian noise of std ``count_noise`` on the
    count (``b = (sum_k 1[norm_k <= C] + N(0, count_noise^2)) / m``).

    Parameters
    ----------
    initial : float
        The first round's bound.
    quantile : float
        The target fraction of norms within the bound, in (0, 1).
    lr : float, default 0.2
        The geometric learning rate (Andrew et al. use 0.2).
    count_noise : float, default 0.0
        Std of the noise on the count of clipped clients (0: no noise, no privacy for the count).
    """

    def __init__(self, initial: float, quantile: float, lr: float = 0.2, count_noise: float = 0.0) -> None:
        check_clip_norm(initial)
        if not 0.0 < quantile < 1.0:
            raise AggregationError(f"the adaptive bound's quantile must be in (0, 1), got {quantile!r}")
        if not lr > 0 or not math.isfinite(lr):
            raise AggregationError(f"the adaptive bound's learning rate must be > 0, got {lr!r}")
        if not count_noise >= 0 or not math.isfinite(count_noise):
            raise AggregationError(f"the adaptive bound's count noise must be >= 0, got {count_noise!r}")
        self.bound = float(initial)
        self.quantile = float(quantile)
        self.lr = float(lr)
        self.count_noise = float(count_noise)

    def update(self, norms: list[float], clients: int, generator: torch.Generator | None = None) -> float:
        """Move the bound after a round; ``clients`` is the denominator ``m`` (the round's planned
        clients under DP, else those that replied). Returns the new bound."""
        if clients < 1:
            return self.bound
        within = float(sum(1 for n in norms if n <= self.bound))
        if self.count_noise > 0:
            within += float(torch.randn((), generator=generator, dtype=torch.float64)) * self.count_noise
        self.bound *= math.exp(-self.lr * (within / clients - self.quantile))
        return self.bound

    def state_dict(self) -> dict[str, float]:
        return {"bound": self.bound, "quantile": self.quantile, "lr": self.lr, "count_noise": self.count_noise}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        try:
            bound = float(sd["bound"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AggregationError(f"malformed adaptive clipping state: {exc!r}") from exc
        self.bound = check_clip_norm(bound) or self.bound


@dataclass(frozen=True)
class GaussianSumNoise:
    """Client-level differential privacy for one round (DP-FedAvg, McMahan et al., ICLR 2018).

    While it is set on a round (:attr:`flexlora.core.aggregators.RoundAccumulator.noise`), every
    client's clipped contribution weighs the same (data-size weights would leak each ``n_k`` and
    break the sensitivity bound), each module's sum gets Gaussian noise of std ``std`` (``z C``) on
    every entry, and the sum is divided by ``clients``, the round's fixed number of sampled
    clients (not the number that replied). The noise is dense, so the noisy sum is formed one
    module at a time; what follows (the SVD that redistributes it) is post-processing.

    Attributes
    ----------
    std : float
        The noise std on the sum, ``noise_multiplier * clip_norm``.
    clients : int
        The denominator: the clients sampled for the round.
    seed : int
        Seeds the noise of each module (``stable_seed(seed, module)``); draw it from a secret
        source (:mod:`secrets`) for a real guarantee.
    """

    std: float
    clients: int
    seed: int

    def __post_init__(self) -> None:
        if isinstance(self.std, bool) or not isinstance(self.std, int | float) or not 0 <= self.std < math.inf:
            raise AggregationError(f"the noise std must be a non-negative finite number, got {self.std!r}")
        if isinstance(self.clients, bool) or not isinstance(self.clients, int) or self.clients < 1:
            raise AggregationError(f"the noise's number of clients must be a positive int, got {self.clients!r}")

    def sample(self, module: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None,
               part: str = "") -> torch.Tensor:
        """The noise of ``module`` (``part`` tells apart the tensors of one module, such as A and B)."""
        gen = torch.Generator(device=device or "cpu").manual_seed(stable_seed("dp-noise", self.seed, module, part))
        return torch.randn(shape, generator=gen, dtype=dtype, device=device) * self.std
