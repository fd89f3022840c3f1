"""HetLoRA: zero-padding aggregation with sparsity-aware weights, and rank self-pruning.

Paper: Y. J. Cho, L. Liu, Z. Xu, A. Fahrezi, G. Joshi, "Heterogeneous LoRA for Federated
Fine-tuning of On-Device Foundation Models", EMNLP 2024 (arXiv 2401.06432, 2024),
https://arxiv.org/abs/2401.06432.

Each client's factors are zero-padded to the round's largest rank and averaged factor-wise with
weights proportional to the Frobenius norm of the client's update ``||s_k B_k A_k||_F``
(per module). A client of rank ``r`` receives the first ``r`` rows of ``A`` and columns of ``B``.
Clients add :func:`rank_pruning_penalty` to their loss so that the information they hold
concentrates in the leading ranks, which truncation keeps.

Each client's scaling ``s_k`` (``alpha_k / r_k``, or ``alpha_k / sqrt(r_k)`` with rsLoRA) is folded
into its ``B`` before averaging, so clients with different ranks, alphas or scaling rules are
combined on the scale of their effective updates.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch

from flexlora.core.aggregators.base import (
    Aggregator,
    GlobalState,
    ModuleState,
    RoundAccumulator,
    _check_alpha,
    _check_rslora,
    check_state,
)
from flexlora.core.lowrank import frobenius_of_product, pad_to_rank, stable_seed
from flexlora.core.types import (
    AggregationError,
    ClientUpdate,
    Factors,
    check_rank_request,
    lora_scaling_denominator,
)

_WEIGHTINGS = ("norm", "norm_size", "size")


class HetLoRA(Aggregator):
    """Zero-padding aggregation of heterogeneous-rank LoRA factors (Cho et al.).

    Parameters
    ----------
    weighting : {"norm", "norm_size", "size"}, default "norm"
        "norm" weights each client by the Frobenius norm of its module update (sparsity-aware,
        as in the paper); "norm_size" multiplies that by ``n_k``; "size" uses ``p_k`` alone.
    check_finite : bool, default True
        Reject updates holding NaN or Inf, or too large for float32 (``MAX_UPDATE_NORM``).
    seed : int, default 0
        Seeds the directions used when a client asks for more rank than the global holds.
    clip_norm : float or None, default None
        Bound on each client's contribution, over all modules together (:mod:`flexlora.core.clipping`).
        For factor averaging it bounds the factor change ``(A - A0, B - B0)``.
    """

    name = "hetlora"
    averages_factors = True

    def __init__(self, *, weighting: str = "norm", check_finite: bool = True, seed: int = 0,
                 clip_norm: float | None = None) -> None:
        super().__init__(check_finite=check_finite, seed=seed, clip_norm=clip_norm)
        if weighting not in _WEIGHTINGS:
            raise AggregationError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting

    def begin_round(
        self, previous: GlobalState | None = None, *, ranks: Sequence[Mapping[str, int]] | None = None
    ) -> RoundAccumulator:
        """Streaming aggregation: running zero-padded sums of the scaled factors with the raw
        weights (norm, norm x examples or examples), normalised at ``finish``; for the norm
        weightings the example-weighted sums are kept beside them for the all-zero fallback
        (see :meth:`Aggregator.begin_round`)."""
        return _HetLoRAAccumulator(self, previous)

    def distribute(
        self, state: GlobalState, rank: int | Mapping[str, int], alpha: float = 16.0, *, rslora: bool = False
    ) -> dict[str, Factors]:
        """The first ``r`` ranks of the padded global factors (truncation, as in the paper), with
        ``B`` divided by the receiver's scaling (``alpha / r``, or ``alpha / sqrt(r)`` with ``rslora``)."""
        check_state(state, self.name, factors=True)
        _check_alpha(alpha)
        _check_rslora(rslora)
        ranks = check_rank_request(rank, state.shapes)
        out: dict[str, Factors] = {}
        for m, r in ranks.items():
            st = state.modules[m]
            assert st.A is not None and st.B is not None
            keep = min(r, st.rank)
            A = st.A[:keep].clone()
            B = st.B[:, :keep] * (st.scale * lora_scaling_denominator(r, rslora) / float(alpha))
            out[m] = pad_to_rank(A, B, r, st.A.new_zeros(st.shape[1], 0), stable_seed(self.seed, m, r))
        return out


def _tail_start(rank: int, gamma: float) -> int:
    return max(1, min(rank, math.floor(gamma * rank)))


def _check_pruning_input(factors: Mapping[str, Factors], gamma: float) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")
    if not factors:
        raise ValueError("needs at least one module")
    for m, pair in factors.items():
        a, b = pair
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"module {m!r}: expected (A: r x in, B: out x r), got A{tuple(a.shape)} and "
                             f"B{tuple(b.shape)}; pass (A, B) in that order")


def rank_pruning_penalty(
    factors: Mapping[str, Factors], *, gamma: float = 0.99, strength: float = 1.0
) -> torch.Tensor:
    """HetLoRA's rank self-pruning regulariser, differentiable in every factor.

    ``strength * sum_modules ||B[:, t:]||_F * ||A[t:, :]||_F`` with ``t = floor(gamma * r)``:
    it penalises the tail ranks that truncation would drop first.

    Parameters
    ----------
    factors : mapping of module -> (A, B)
        The client's live LoRA parameters (``A: r x in``, ``B: out x r``), usually requiring grad.
    gamma : float, default 0.99
        Fraction of each module's rank that is not penalised, in (0, 1].
    strength : float, default 1.0
        The regularisation coefficient (lambda).

    Returns
    -------
    Tensor
        A scalar connected to the autograd graph of the factors.
    """
    _check_pruning_input(factors, gamma)
    terms = []
    for A, B in factors.values():
        t = _tail_start(A.shape[0], gamma)
        terms.append(torch.linalg.norm(B[:, t:]) * torch.linalg.norm(A[t:, :]))
    return strength * torch.stack(terms).sum()


def pruned_ranks(
    factors: Mapping[str, Factors], *, gamma: float = 0.99, threshold: float = 1e-3
) -> dict[str, int]:
    """HetLoRA's self-pruning decision: the rank each module keeps for the next round.

    A module's rank drops to ``floor(gamma * r)`` when its tail's share of the update,
    ``||B[:, t:]|| ||A[t:, :]|| / (||B|| ||A||)``, is below ``threshold``; otherwise it stays.
    """
    _check_pruning_input(factors, gamma)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= threshold < math.inf:
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
    out = {}
    for m, (A, B) in factors.items():
        r = A.shape[0]
        t = _tail_start(r, gamma)
        with torch.no_grad():
            full = float(torch.linalg.norm(B) * torch.linalg.norm(A))
            tail = float(torch.linalg.norm(B[:, t:]) * torch.linalg.norm(A[t:, :]))
        out[m] = t if (t < r and full > 0 and tail / full < threshold) else r
    return out


class _PaddedSum:
    """``sum_k w_k pad(A_k)`` and ``sum_k w_k pad(B_k)``, zero-padded to the largest rank so far."""

    def __init__(self) -> None:
        self.A: torch.Tensor | None = None
        self.B: torch.Tensor | None = None
        self.weight = 0.0

    def add(self, w: float, a: torch.Tensor, b: torch.Tensor) -> None:
        r = a.shape[0]
        if self.A is None or self.B is None:
            self.A, self.B = torch.zeros_like(a), torch.zeros_like(b)
        if r > self.A.shape[0]:
            grow = r - self.A.shape[0]
            self.A = torch.cat([self.A, self.A.new_zeros(grow, self.A.shape[1])], dim=0)
            self.B = torch.cat([self.B, self.B.new_zeros(self.B.shape[0], grow)], dim=1)
        self.A[:r] += w * a
        self.B[:, :r] += w * b
        self.weight += w


class _HetLoRAAccumulator(RoundAccumulator):
    aggregator: HetLoRA

    def __init__(self, aggregator: HetLoRA, previous: GlobalState | None) -> None:
        super().__init__(aggregator, previous)
        self.by_weight: dict[str, _PaddedSum] = {}
        self.by_size: dict[str, _PaddedSum] = {}
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None

    def _fold(self, update: ClientUpdate, label: str) -> None:
        weighting = self.aggregator.weighting
        if self.dtype is None:
            first_a = next(iter(update.factors.values()))[0]
            self.dtype = torch.float64 if first_a.dtype == torch.float64 else torch.float32
            self.device = first_a.device
        n = float(update.num_examples)
        for name, (a, b) in update.factors.items():
            a = a.to(device=self.device, dtype=self.dtype)
            b = b.to(device=self.device, dtype=self.dtype) * update.scale(name)
            if weighting == "size":
                w = n
            else:
                w = float(frobenius_of_product(b.double(), a.double()))
                if weighting == "norm_size":
                    w *= n
                self.by_size.setdefault(name, _PaddedSum()).add(n, a, b)
            self.by_weight.setdefault(name, _PaddedSum()).add(w, a, b)

    def _finish(self) -> GlobalState:
        assert self.shapes is not None
        modules: dict[str, ModuleState] = {}
        for name, shape in self.shapes.items():
            acc = self.by_weight.pop(name)
            if not acc.weight > 0.0:
                # Every update of this module is zero (e.g. the first steps of LoRA with B = 0): the
                # norms carry no information, so fall back to data-size weights.
                acc = self.by_size.pop(name, acc)
            assert acc.A is not None and acc.B is not None
            modules[name] = ModuleState(shape=shape, A=acc.A / acc.weight, B=acc.B / acc.weight, scale=1.0)
        return GlobalState(aggregator=self.aggregator.name, modules=modules, round=self._next_round())
