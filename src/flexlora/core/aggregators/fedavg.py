"""Homogeneous factor-wise averaging: FedAvg / FedIT.

Papers: H. B. McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, https://arxiv.org/abs/1602.05629 (FedAvg); J. Zhang et al.,
"Towards Building the Federated GPT: Federated Instruction Tuning", ICASSP 2024,
https://arxiv.org/abs/2305.05644 (FedIT: FedAvg of LoRA factors, AdamW locally).

``A`` and ``B`` are averaged separately with weights ``p_k``. The product of the averages is not
the average of the products; that inexactness is the point of comparison with FlexLoRA. Every
client must use the same rank per module, the same alpha and the same scaling rule (plain LoRA or
rsLoRA).
"""

from __future__ import annotations

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
from flexlora.core.types import (
    AggregationError,
    ClientUpdate,
    Factors,
    check_rank_request,
    lora_scaling,
    lora_scaling_denominator,
)


class FedAvg(Aggregator):
    """Factor-wise weighted averaging of homogeneous LoRA adapters.

    Parameters
    ----------
    check_finite : bool, default True
        Reject updates holding NaN or Inf, or too large for float32 (``MAX_UPDATE_NORM``).
    clip_norm : float or None, default None
        Bound on each client's contribution, over all modules together (:mod:`flexlora.core.clipping`).
        For factor averaging it bounds the factor change ``(A - A0, B - B0)``.
    """

    name = "fedavg"
    averages_factors = True

    def __init__(self, *, check_finite: bool = True, clip_norm: float | None = None) -> None:
        super().__init__(check_finite=check_finite, clip_norm=clip_norm)

    def begin_round(
        self, previous: GlobalState | None = None, *, ranks: Sequence[Mapping[str, int]] | None = None
    ) -> RoundAccumulator:
        """Streaming aggregation: running sums ``sum_k n_k A_k`` and ``sum_k n_k B_k`` per module,
        divided by ``N`` at ``finish`` (see :meth:`Aggregator.begin_round`)."""
        return _FedAvgAccumulator(self, previous)

    def distribute(
        self, state: GlobalState, rank: int | Mapping[str, int], alpha: float = 16.0, *, rslora: bool = False
    ) -> dict[str, Factors]:
        """The averaged factors themselves; ``rank`` must equal the common rank.

        When ``alpha`` or ``rslora`` differ from the clients' (the state holds the clients' scale),
        ``B`` is rescaled so that the receiver's effective update equals the global update.
        """
        check_state(state, self.name, factors=True)
        _check_alpha(alpha)
        _check_rslora(rslora)
        ranks = check_rank_request(rank, state.shapes)
        out: dict[str, Factors] = {}
        for m, r in ranks.items():
            st = state.modules[m]
            if r != st.rank:
                raise AggregationError(
                    f"fedavg holds rank {st.rank} for module {m!r} but rank {r} was requested; fedavg "
                    "cannot re-rank adapters (use 'flexlora' for heterogeneous ranks)"
                )
            assert st.A is not None and st.B is not None
            out[m] = (st.A.clone(), st.B * (st.scale * lora_scaling_denominator(r, rslora) / float(alpha)))
        return out


class _FedAvgAccumulator(RoundAccumulator):
    supports_noise = True
    def __init__(self, aggregator: FedAvg, previous: GlobalState | None) -> None:
        super().__init__(aggregator, previous)
        self.first: ClientUpdate | None = None
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _fold(self, update: ClientUpdate, label: str) -> None:
        first = self.first or update
        if float(update.alpha) != float(first.alpha):
            raise AggregationError(
                f"{label}: fedavg needs the same alpha on every client, got {sorted({first.alpha, update.alpha})}; "
                "use 'flexlora' (or 'hetlora') for heterogeneous clients"
            )
        if update.rslora != first.rslora:
            raise AggregationError(
                f"{label}: fedavg needs the same rslora setting on every client, but the round mixes alpha / r and "
                "alpha / sqrt(r) scaling; use 'flexlora' (or 'hetlora') for heterogeneous clients"
            )
        for name in update.factors:
            if update.rank(name) != first.rank(name):
                raise AggregationError(
                    f"fedavg averages A and B factor-wise and needs one rank per module, but module {name!r} has "
                    f"mixed ranks ({first.label(0)}: {first.rank(name)}, {label}: {update.rank(name)}); use "
                    "'flexlora' for heterogeneous ranks"
                )
        self.first = first
        n = float(update.num_examples)
        for name, (a, b) in update.factors.items():
            dtype = torch.float64 if first.factors[name][0].dtype == torch.float64 else torch.float32
            if name not in self.sums:
                self.sums[name] = (n * a.to(dtype), n * b.to(dtype))
            else:
                sa, sb = self.sums[name]
                sa.add_(a.to(dtype), alpha=n)
                sb.add_(b.to(dtype), alpha=n)

    def _finish(self) -> GlobalState:
        assert self.first is not None and self.shapes is not None
        first, total = self.first, self._denominator(float(self.total_examples))
        modules = {}
        for name, shape in self.shapes.items():
            sa, sb = self.sums.pop(name)
            if self.noise is not None:
                # The factors themselves are what is released: noise on both sums (the clipped
                # vector is every module's A and B together).
                sa = sa + self.noise.sample(name, tuple(sa.shape), sa.dtype, sa.device, "A")
                sb = sb + self.noise.sample(name, tuple(sb.shape), sb.dtype, sb.device, "B")
            scale = lora_scaling(first.alpha, first.rank(name), first.rslora)
            modules[name] = ModuleState(shape=shape, A=sa / total, B=sb / total, scale=scale)
        extra: dict = {"alpha": float(first.alpha), "rslora": True} if first.rslora else {"alpha": float(first.alpha)}
        return GlobalState(aggregator=self.aggregator.name, modules=modules, round=self._next_round(), extra=extra)
