"""FLoRA: exact aggregation by stacking.

Paper: Z. Wang, Z. Shen, Y. He, G. Sun, H. Wang, L. Lyu, A. Li, "FLoRA: Federated Fine-Tuning
Large Language Models with Heterogeneous Low-Rank Adaptations", NeurIPS 2024,
https://arxiv.org/abs/2409.05976.

Clients' factors are stacked (``B`` by columns scaled by ``p_k s_k`` with each client's LoRA
scaling ``s_k``, ``A`` by rows), so the product of the stacks is exactly ``sum_k p_k s_k B_k A_k``. In FLoRA, clients
train a fresh LoRA each round on top of the current global model, so a round's stacked update
is an increment that is added to the previous global update. With partial participation the
increment is the weighted mean over the sampled clients only, and absent clients contribute
nothing. The stack is compressed exactly (by an SVD that keeps every nonzero direction) once its
rank exceeds ``min(out, in)``, so it never grows beyond the size of a dense update.
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
from flexlora.core.lowrank import svd_of_dense, svd_of_product
from flexlora.core.lowrank_sum import LowRankSum
from flexlora.core.types import (
    AggregationError,
    ClientUpdate,
    Factors,
    lora_scaling_denominator,
)


class FLoRA(Aggregator):
    """Stacking aggregation (exact sum of products), accumulated over rounds.

    Parameters
    ----------
    accumulate : bool, default True
        Add each round's stacked increment to the previous global update (FLoRA's protocol,
        where clients start a fresh LoRA every round). False makes each round's state the
        stacked average alone.
    check_finite : bool, default True
        Reject updates holding NaN or Inf, or too large for float32 (``MAX_UPDATE_NORM``).
    seed : int, default 0
        Seeds the padding directions of :meth:`distribute` beyond the global rank.
    clip_norm : float or None, default None
        Bound on each client's contribution, over all modules together (:mod:`flexlora.core.clipping`).
        FLoRA's clients start from a fresh adapter every round, so the contribution is the
        whole product ``s_k B_k A_k``.
    """

    name = "flora"

    def __init__(self, *, accumulate: bool = True, check_finite: bool = True, seed: int = 0,
                 clip_norm: float | None = None) -> None:
        super().__init__(check_finite=check_finite, seed=seed, clip_norm=clip_norm)
        if not isinstance(accumulate, bool):
            raise AggregationError(f"accumulate must be True or False, got {accumulate!r}")
        self.accumulate = accumulate

    def begin_round(
        self, previous: GlobalState | None = None, *, ranks: Sequence[Mapping[str, int]] | None = None
    ) -> RoundAccumulator:
        """Streaming aggregation: the round's stack ``[n_k s_k B_k]``, ``[A_k]`` per module, kept
        dense once wider than ``min(out, in)`` (:class:`~flexlora.core.lowrank_sum.LowRankSum`); the
        previous global update is put in front at ``finish``. FLoRA's global state is the stack
        itself, so its size still grows with the clients until it reaches ``min(out, in)``
        (see :meth:`Aggregator.begin_round`)."""
        return _FLoRAAccumulator(self, previous)

    def sent_factors(self, previous: GlobalState | None, update: ClientUpdate) -> dict[str, Factors] | None:
        """None: FLoRA's clients start every round from a fresh adapter (the global is merged into
        their base), so each contribution is the client's whole product."""
        return None

    def stacked(self, state: GlobalState, alpha: float = 16.0, *, rslora: bool = False) -> dict[str, Factors]:
        """The exact global update as LoRA factors of rank ``R`` (the stack's size) per module.

        Parameters
        ----------
        state : GlobalState
        alpha : float, default 16.0
            The receiver's LoRA alpha.
        rslora : bool, default False
            The receiver scales by ``alpha / sqrt(R)`` (rsLoRA) instead of ``alpha / R``.

        Returns
        -------
        dict of str to (Tensor, Tensor)
            ``(A, B)`` whose ``(alpha / R) B @ A`` (``(alpha / sqrt(R)) B @ A`` with ``rslora``)
            equals the global update exactly.
        """
        check_state(state, self.name)
        _check_alpha(alpha)
        _check_rslora(rslora)
        out = {}
        for m, st in state.modules.items():
            A, B = _as_factors(st)
            out[m] = (A.clone(), B * (lora_scaling_denominator(A.shape[0], rslora) / float(alpha)))
        return out

    def distribute(
        self, state: GlobalState, rank: int | Mapping[str, int], alpha: float = 16.0, *, rslora: bool = False
    ) -> dict[str, Factors]:
        """Best rank-``r`` approximation of the (exact) stacked global update.

        Use :meth:`stacked` for the full, untruncated update.
        """
        return super().distribute(state, rank, alpha, rslora=rslora)


def _as_factors(st: ModuleState) -> tuple[torch.Tensor, torch.Tensor]:
    if st.svd is not None:
        return st.svd.V.T, st.svd.U * st.svd.S
    assert st.A is not None and st.B is not None
    return st.A, st.B * st.scale


class _FLoRAAccumulator(RoundAccumulator):
    aggregator: FLoRA
    supports_noise = True

    def __init__(self, aggregator: FLoRA, previous: GlobalState | None) -> None:
        super().__init__(aggregator, previous)
        self.sums: dict[str, LowRankSum] = {}

    def _fold(self, update: ClientUpdate, label: str) -> None:
        n = float(update.num_examples)
        for name, (a, b) in update.factors.items():
            if name not in self.sums:
                dtype = a.dtype if a.dtype == torch.float64 else torch.float32
                self.sums[name] = LowRankSum((b.shape[0], a.shape[1]), dtype=dtype, device=a.device)
            coef = n * float(update.alpha) / lora_scaling_denominator(a.shape[0], update.rslora)
            lsum = self.sums[name]
            # B is scaled into a new tensor; A is held as given unless add() was asked to copy.
            lsum.add(b.to(device=lsum.device or b.device, dtype=lsum.dtype) * coef,
                     a.to(device=lsum.device or a.device, dtype=lsum.dtype, copy=self._copy), copy=False)

    def _finish(self) -> GlobalState:
        assert self.shapes is not None
        total = self._denominator(float(self.total_examples))
        prev_state = self.previous if self.aggregator.accumulate else None
        modules: dict[str, ModuleState] = {}
        for name, shape in self.shapes.items():
            lsum = self.sums.pop(name)
            prev = None
            if prev_state is not None and name in prev_state.modules:
                st = prev_state.modules[name]
                if st.shape != shape:
                    raise ValueError(f"module {name!r}: shape {shape} differs from the previous state's {st.shape}")
                prev = _as_factors(st)
            noisy = None
            if self.noise is not None:
                # The noise is dense: this module's increment is formed densely (one at a time).
                noisy = lsum.dense()
                noisy.add_(self.noise.sample(name, shape, noisy.dtype, noisy.device))
            if noisy is not None or lsum.is_dense:
                d = noisy if noisy is not None else lsum.dense_sum
                assert d is not None
                d.mul_(1.0 / total)
                if prev is not None:
                    d.addmm_(prev[1].to(d), prev[0].to(d))
                svd = svd_of_dense(d)
                B, A = svd.U * svd.S, svd.V.T.contiguous()
            else:
                B, A = lsum.stack()
                B = B * (1.0 / total)
                if prev is not None:
                    A = torch.cat([prev[0].to(A), A], dim=0)
                    B = torch.cat([prev[1].to(B), B], dim=1)
                if A.shape[0] > min(shape):
                    svd = svd_of_product(B, A, method="dense")
                    B, A = svd.U * svd.S, svd.V.T.contiguous()
            modules[name] = ModuleState(shape=shape, A=A, B=B, scale=1.0)
        return GlobalState(aggregator=self.aggregator.name, modules=modules, round=self._next_round())
