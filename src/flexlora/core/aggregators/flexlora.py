"""FlexLoRA aggregation.

Paper: J. Bai, D. Chen, B. Qian, L. Yao, Y. Li, "Federated Fine-tuning of Large Language Models
under Heterogeneous Tasks and Client Resources", NeurIPS 2024, https://arxiv.org/abs/2402.11505.

Each round the server forms every module's full-size weighted update
``dW = sum_k p_k s_k B_k A_k`` (``s_k = alpha_k / r_k``, or ``alpha_k / sqrt(r_k)`` for an
rsLoRA client) and sends each client the best rank-``r_k`` approximation of it, from one SVD per module per round. The SVD is computed exactly from two
thin QR factorisations of the stacked factors when the total rank is small (the dense matrix is
never formed), and from a dense SVD otherwise (see :mod:`flexlora.core.lowrank`).

Faithful FlexLoRA suffers "rank collapse" (Wu, Hu, Min, Wang, "Preventing Rank Collapse in
Federated Low-Rank Adaptation with Client Heterogeneity", arXiv 2602.13486): a client of rank
``r`` receives only the top ``r`` directions of the global update and sends back a product of
rank ``r``, so direction ``i`` of the global update is carried into the next round only by the
clients whose rank exceeds ``i``, and before any new learning its singular value shrinks by the
factor ``P_i = sum_{k: r_k > i} p_k`` every round. Two remedies are offered as options
(``remedy=``); the faithful method stays the default:

- ``"server-memory"`` (error feedback): the server keeps the global update ``G_t`` (at
  ``max_rank``) and adds each client's *change* to what it received,
  ``G_{t+1} = G_t + sum_k p_k (s_k B_k A_k - T_{r_k}(G_t))``, where ``T_r`` is the rank-``r``
  truncation the client was sent. Since ``sum_k p_k T_{r_k}(G_t) = U diag(P_i S_i) V^T``, this is
  the faithful stack plus one low-rank term ``U diag((1 - P_i) S_i) V^T`` over the directions some
  client lacks, so it stays on the exact thin-QR path. Clients send what they send today.
- ``"rank-partitioned"``: every client's factors are split at the distinct ranks of the round's
  clients (column ``i`` of ``B_k`` and row ``i`` of ``A_k`` line up with direction ``i`` of the
  distributed global update), and partition ``j`` is averaged over only the clients that hold it,
  with ``p_k`` renormalised among them. The idea of rank-partitioned aggregation is raFLoRA's
  (arXiv 2602.13486 above); this is our implementation of it within FlexLoRA's SVD redistribution.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import torch

from flexlora.core.aggregators.base import (
    Aggregator,
    BufferedAccumulator,
    GlobalState,
    ModuleState,
    RoundAccumulator,
)
from flexlora.core.lowrank import (
    LowRankSVD,
    batches_well,
    randomized_svd_of_dense,
    svd_of_dense,
    svd_of_product,
    svd_of_products,
)
from flexlora.core.lowrank_sum import LowRankSum
from flexlora.core.types import (
    AggregationError,
    ClientUpdate,
    lora_scaling_denominator,
)

REMEDIES = ("none", "server-memory", "rank-partitioned")
"""The values of FlexLoRA's ``remedy`` option (module docstring)."""


class FlexLoRA(Aggregator):
    """FlexLoRA: full-size weighted averaging, redistributed by truncated SVD.

    Parameters
    ----------
    max_rank : int or None, default None
        Largest rank that will be distributed. The state keeps only that many singular triplets
        per module, which saves memory and time; None keeps the full rank of each update
        (``min(sum_k r_k, out, in)``) so any rank can be distributed exactly.
    svd_method : {"auto", "cholesky", "gram", "qr", "dense", "randomized"}, default "auto"
        "auto" picks the thin-QR path when the round's total rank is at most
        ``dense_threshold * min(out, in)``, and a dense SVD otherwise; both are exact.
        "cholesky" is an exact path from float64 Grams (about as fast as "qr" on CPU and ten
        times more accurate; it falls back to "qr" on nearly collinear stacks).
        "gram" is the float64 Gram path (more accurate, slower on CPU; it falls back to "qr"
        when its checks fail, see :func:`flexlora.core.lowrank.svd_of_product`).
        "randomized" is approximate (error bound in
        :func:`flexlora.core.lowrank.randomized_svd_of_product`) and needs ``max_rank``.
    dense_threshold : float, default 0.85
        Crossover of "auto", as a fraction of ``min(out, in)``. Measured on 2 CPU cores at
        4096 x 4096 (top 200 kept): thin QR 3.8 s at R = 2000 and 9.2 s at R = 3600, against
        11.2 s for the dense SVD, so the QR path pays until ``R`` is close to ``min(out, in)``.
        For non-square modules the dense SVD costs relatively more, so the crossover is safe.
    oversample : int, default 10
        Randomized SVD oversampling.
    power_iters : int, default 2
        Randomized SVD power iterations.
    split : {"B", "A", "sqrt"}, default "B"
        Where distributed factors carry the singular values; "B" is the paper's choice
        (``A = V_r^T``, ``B = U_r S_r / s`` with the receiver's scaling ``s``).
    check_finite : bool, default True
        Reject updates holding NaN or Inf, or too large for float32 (``MAX_UPDATE_NORM``).
    seed : int, default 0
        Seeds the randomized SVD and the orthonormal padding used when a client's rank exceeds
        the rank of the global update.
    remedy : {"none", "server-memory", "rank-partitioned"}, default "none"
        Rank-collapse remedy (module docstring). "none" is the paper's FlexLoRA. "server-memory"
        needs ``previous`` to be the state the round's clients were sent (the engines pass it).
    stream_bound : int or None, default None
        Streaming aggregation (:meth:`begin_round`): the width of a module's running stack of
        factors that triggers its exact compression (:class:`~flexlora.core.lowrank_sum.LowRankSum`);
        None is ``min(out, in)``, past which the running sum is kept dense.
    clip_norm : float or None, default None
        Bound on each client's contribution ``s_k B_k A_k - T_{r_k}(G)`` (its change from what it
        was sent), over all modules together (:mod:`flexlora.core.clipping`); a contribution over it
        is scaled down to it, exactly: the fold takes ``T + c D_k`` as two low-rank terms.
    batch_modules : bool or None, default None
        Run the thin-QR SVDs of modules of one shape as one batched call
        (:func:`flexlora.core.lowrank.svd_of_products`). None batches on CUDA only, where one call
        per small module leaves the device idle; on CPU batching pays only for narrow stacks
        (docs/BENCHMARKS.md), so None leaves CPU rounds as they were. The modules to batch are
        held until the end of the aggregation. Batched results equal unbatched ones to float32
        rounding (not bit for bit); a run is reproducible either way.
    """

    name = "flexlora"

    def __init__(
        self,
        *,
        max_rank: int | None = None,
        svd_method: str = "auto",
        dense_threshold: float = 0.85,
        oversample: int = 10,
        power_iters: int = 2,
        split: str = "B",
        check_finite: bool = True,
        seed: int = 0,
        remedy: str = "none",
        stream_bound: int | None = None,
        batch_modules: bool | None = None,
        clip_norm: float | None = None,
    ) -> None:
        super().__init__(split=split, check_finite=check_finite, seed=seed, clip_norm=clip_norm)
        if remedy not in REMEDIES:
            raise AggregationError(
                f"remedy must be one of {', '.join(repr(r) for r in REMEDIES)}, got {remedy!r} "
                "(in a config: aggregator_options = {remedy = \"server-memory\"})"
            )
        if svd_method not in ("auto", "cholesky", "gram", "qr", "dense", "randomized"):
            raise AggregationError(
                f"svd_method must be 'auto', 'cholesky', 'gram', 'qr', 'dense' or 'randomized', got {svd_method!r}"
            )
        if svd_method == "randomized" and max_rank is None:
            raise AggregationError("svd_method='randomized' needs max_rank (the largest rank to distribute)")
        if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
            raise AggregationError(f"max_rank must be a positive int or None, got {max_rank!r}")
        if isinstance(dense_threshold, bool) or not isinstance(dense_threshold, numbers.Real) \
                or not 0.0 < dense_threshold <= 1.0:
            raise AggregationError(f"dense_threshold must be a number in (0, 1], got {dense_threshold!r}")
        for key, value, low in (("oversample", oversample, 0), ("power_iters", power_iters, 0), ("seed", seed, None)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (low is not None and value < low):
                kind = "a non-negative int" if low is not None else "an int"
                raise AggregationError(f"{key} must be {kind}, got {value!r}")
        self.max_rank = max_rank
        self.svd_method = svd_method
        self.dense_threshold = dense_threshold
        self.oversample = oversample
        self.power_iters = power_iters
        self.remedy = remedy
        if stream_bound is not None and (isinstance(stream_bound, bool) or not isinstance(stream_bound, int)
                                         or stream_bound < 1):
            raise AggregationError(f"stream_bound must be a positive int or None, got {stream_bound!r}")
        self.stream_bound = stream_bound
        if batch_modules is not None and not isinstance(batch_modules, bool):
            raise AggregationError(f"batch_modules must be true, false or absent (auto), got {batch_modules!r}")
        self.batch_modules = batch_modules

    def _check_ranks(self, state: GlobalState, ranks: Mapping[str, int]) -> None:
        # A rank above max_rank cannot be served once the state was truncated to max_rank: it no
        # longer holds the directions such a client would need.
        if self.max_rank is None:
            return
        for m, r in ranks.items():
            if r > self.max_rank and state.modules[m].rank >= self.max_rank:
                raise AggregationError(
                    f"module {m!r}: rank {r} requested, but this FlexLoRA keeps only max_rank = {self.max_rank} "
                    f"directions of the global update, so it cannot send the best rank-{r} approximation; set "
                    "max_rank to the largest rank it will distribute"
                )

    def begin_round(
        self, previous: GlobalState | None = None, *, ranks: Sequence[Mapping[str, int]] | None = None
    ) -> RoundAccumulator:
        """Streaming aggregation (see :meth:`Aggregator.begin_round`): each update is folded into
        one :class:`~flexlora.core.lowrank_sum.LowRankSum` per module (per rank partition with
        ``remedy="rank-partitioned"``, which needs ``ranks`` for that; without it the round is
        buffered until ``finish``, where the ranks that replied are planned).

        With ``remedy="none"`` or ``"rank-partitioned"``, ``previous`` only numbers the round,
        because each client's factors already start from the distributed global update. With
        ``"server-memory"`` it must be the state the clients received (None in the first round).
        """
        if self.remedy == "rank-partitioned" and ranks is None:
            return BufferedAccumulator(self, previous)
        return _FlexLoRAAccumulator(self, previous, ranks)

    def _svd(self, Bc: torch.Tensor, Ac: torch.Tensor, generator: torch.Generator | None) -> LowRankSVD:
        return svd_of_product(
            Bc,
            Ac,
            method=self.svd_method,  # type: ignore[arg-type]
            dense_threshold=self.dense_threshold,
            max_rank=self.max_rank,
            oversample=self.oversample,
            power_iters=self.power_iters,
            generator=generator,
        )


class _FlexLoRAAccumulator(RoundAccumulator):
    """FlexLoRA's streaming round: ``n_k s_k B_k A_k`` summed per module (per rank partition),
    divided by the examples at :meth:`finish` (``p_k = n_k / N`` needs the round's total)."""

    aggregator: FlexLoRA
    folds_clipped_products = True
    supports_noise = True

    def __init__(self, aggregator: FlexLoRA, previous: GlobalState | None,
                 ranks: Sequence[Mapping[str, int]] | None) -> None:
        super().__init__(aggregator, previous)
        self.planned = ranks
        self.partitions: dict[str, list[tuple[int, int]]] = {}
        self.sums: dict[str, list[LowRankSum]] = {}
        self.held: dict[str, list[int]] = {}  # examples of the clients holding each partition
        self.ranks: dict[str, list[tuple[int, int]]] = {}  # (rank, examples) per client, per module

    def _partitions(self, module: str, shape: tuple[int, int]) -> list[tuple[int, int]]:
        if self.aggregator.remedy != "rank-partitioned":
            return [(0, min(shape))]
        assert self.planned is not None
        bounds = sorted({int(r[module]) for r in self.planned if module in r})
        return list(zip([0, *bounds[:-1]], bounds))

    def _fold(self, update: ClientUpdate, label: str) -> None:
        assert self.shapes is not None
        # Checked before anything is set up, so that a refused first update leaves the round empty.
        partitions = self.partitions or {m: self._partitions(m, shape) for m, shape in self.shapes.items()}
        if self.aggregator.remedy == "rank-partitioned" and self.noise is not None:
            raise AggregationError("remedy='rank-partitioned' averages each rank band over its own holders, so one "
                                   "client's share of a band is not bounded by the DP sensitivity; use remedy "
                                   "'none' or 'server-memory' with noise")
        if self.aggregator.remedy == "rank-partitioned":
            for m, parts in partitions.items():
                r = update.rank(m)
                if r not in {hi for _, hi in parts}:
                    raise AggregationError(
                        f"{label}, module {m!r}: rank {r} is not among the ranks given to begin_round(ranks=...) "
                        f"({sorted(hi for _, hi in parts)}); pass the ranks of every client that may reply"
                    )
        if not self.sums:
            first_a = next(iter(update.factors.values()))[0]
            dtype = first_a.dtype if first_a.dtype == torch.float64 else torch.float32
            self.partitions = partitions
            for m, shape in self.shapes.items():
                self.sums[m] = [LowRankSum(shape, bound=self.aggregator.stream_bound, dtype=dtype,
                                           device=first_a.device) for _ in self.partitions[m]]
                self.held[m] = [0] * len(self.partitions[m])
                self.ranks[m] = []
        n = int(update.num_examples)
        c, sent = self._clip
        for m, parts in self.partitions.items():
            a, b = update.factors[m]
            r = int(a.shape[0])
            lsum = self.sums[m]
            coef = n * float(update.alpha) / lora_scaling_denominator(r, update.rslora)
            # B is scaled into a new tensor; A is held as given unless add() was asked to copy.
            bs = b.to(device=lsum[0].device or b.device, dtype=lsum[0].dtype) * coef
            a = a.to(device=bs.device, dtype=lsum[0].dtype, copy=self._copy)
            pieces = [(bs, a)]
            if c < 1.0:
                # A clipped contribution: T + c (s B A - T) = c s B A + (1 - c) s B0 A0, with T what
                # the client was sent (rank r, its columns aligned with B's, so the rank bands hold).
                pieces = [(bs * c, a)]
                if sent is not None and m in sent:
                    a0, b0 = sent[m]
                    pieces.append((b0.to(bs) * (coef * (1.0 - c)), a0.to(a)))
            # One partition [0, min(out, in)) without rank partitioning; with it, r is a boundary,
            # so every partition starting below r ends at or below it.
            for j, (lo, hi) in enumerate(parts):
                if lo >= r:
                    break
                top = min(hi, r)
                for pb, pa in pieces:
                    lsum[j].add(pb[:, lo:top], pa[lo:top], copy=False)
                self.held[m][j] += n
            self.ranks[m].append((r, n))

    def _finish(self) -> GlobalState:
        agg = self.aggregator
        generator = None
        if agg.svd_method == "randomized":
            device = next(iter(self.sums.values()))[0].device
            generator = torch.Generator(device=device).manual_seed(
                agg.seed + (self.previous.round if self.previous else 0))
        svds = _ModuleSVDs(agg, generator)
        assert self.shapes is not None
        for m, shape in self.shapes.items():
            bs, as_, dense = [], [], None
            for lsum, n_j in zip(self.sums[m], self.held[m]):
                if n_j == 0:
                    continue
                n_j = self._denominator(n_j)
                if lsum.is_dense:
                    d = lsum.dense_sum
                    assert d is not None
                    d.mul_(1.0 / n_j)
                    dense = d if dense is None else dense.add_(d)
                else:
                    b, a = lsum.stack()
                    bs.append(b * (1.0 / n_j))
                    as_.append(a)
            if agg.remedy == "server-memory" and self.previous is not None:
                weights = torch.tensor([n for _, n in self.ranks[m]], dtype=torch.float64) \
                    / self._denominator(self.total_examples)
                lsum0 = self.sums[m][0]
                b0 = bs[0] if bs else torch.zeros(shape[0], 0, dtype=lsum0.dtype, device=lsum0.device)
                a0 = as_[0] if as_ else torch.zeros(0, shape[1], dtype=lsum0.dtype, device=lsum0.device)
                b1, a1 = _with_memory(b0, a0, [r for r, _ in self.ranks[m]], m, weights, self.previous)
                bs, as_ = [b1], [a1]
            self.sums[m] = []
            if self.noise is not None:
                svds.done[m] = self._noisy_svd(m, shape, dense, bs, as_)
            elif dense is not None:
                for b, a in zip(bs, as_):
                    dense.addmm_(b.to(dense.dtype), a.to(dense.dtype))
                svds.done[m] = svd_of_dense(dense, max_rank=agg.max_rank)
            else:
                Bc = torch.cat([b.T for b in bs], dim=0).T if len(bs) > 1 else bs[0]
                Ac = torch.cat(as_, dim=0) if len(as_) > 1 else as_[0]
                svds.add(m, Bc, Ac)
        done = svds.finish()
        modules = {m: ModuleState(shape=shape, svd=done[m]) for m, shape in self.shapes.items()}
        return GlobalState(aggregator=agg.name, modules=modules, round=self._next_round())

    def _noisy_svd(self, m: str, shape: tuple[int, int], dense: torch.Tensor | None, bs: list[torch.Tensor],
                   as_: list[torch.Tensor]) -> LowRankSVD:
        """The SVD of ``(sum + noise) / clients`` for one module (the terms already divided): the
        noise is dense, so this module's sum is formed densely here and released after its SVD."""
        agg, noise = self.aggregator, self.noise
        assert noise is not None
        ref = bs[0] if bs else dense
        assert ref is not None
        out = noise.sample(m, shape, ref.dtype, ref.device).mul_(1.0 / noise.clients)
        if dense is not None:
            out.add_(dense.to(out.dtype))
        for b, a in zip(bs, as_):
            out.addmm_(b.to(out.dtype), a.to(out.dtype))
        if agg.svd_method == "randomized":
            assert agg.max_rank is not None
            gen = torch.Generator(device=out.device).manual_seed(agg.seed + self._next_round())
            return randomized_svd_of_dense(out, agg.max_rank, oversample=agg.oversample,
                                           power_iters=agg.power_iters, generator=gen)
        return svd_of_dense(out, max_rank=agg.max_rank)


class _ModuleSVDs:
    """The SVDs of a round's modules: those that batch well are held and batched at :meth:`finish`,
    the others run at once (so only the held stacks outlive their module's turn)."""

    def __init__(self, aggregator: FlexLoRA, generator: torch.Generator | None) -> None:
        self.agg = aggregator
        self.generator = generator
        self.done: dict[str, LowRankSVD] = {}
        self.held: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, name: str, Bc: torch.Tensor, Ac: torch.Tensor) -> None:
        agg = self.agg
        if batches_well(Bc, Ac, method=agg.svd_method, dense_threshold=agg.dense_threshold,  # type: ignore[arg-type]
                        batch=agg.batch_modules):
            self.held[name] = (Bc, Ac)
        else:
            self.done[name] = agg._svd(Bc, Ac, self.generator)

    def finish(self) -> dict[str, LowRankSVD]:
        agg = self.agg
        results = svd_of_products(list(self.held.values()), batch=agg.batch_modules,
                                  method=agg.svd_method,  # type: ignore[arg-type]
                                  dense_threshold=agg.dense_threshold, max_rank=agg.max_rank)
        self.done.update(zip(self.held, results))
        self.held = {}
        return self.done


def _with_memory(
    Bc: torch.Tensor,
    Ac: torch.Tensor,
    ranks: Sequence[int],
    module: str,
    weights: torch.Tensor,
    previous: GlobalState,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the server-memory term ``U diag(S_i sum_{k: r_k <= i} p_k) V^T`` of ``previous``
    (the part of ``G_t`` the round's clients were not sent) to the stack ``(Bc, Ac)``."""
    if module not in previous.modules:
        raise AggregationError(
            f"remedy='server-memory': module {module!r} is not in the previous global state; the "
            "previous state must be the one the round's clients were sent"
        )
    svd = previous.modules[module].to_svd()
    k = int(svd.S.shape[0])
    lo = min(ranks)
    if lo >= k:
        return Bc, Ac  # every client was sent all of G_t: nothing kept back
    p = weights.tolist()
    # Weight of the clients *lacking* direction i, summed directly (not 1 - P_i, which would
    # leave rounding noise on the directions every client holds).
    lack = torch.tensor([sum(pk for pk, r in zip(p, ranks) if r <= i) for i in range(lo, k)], dtype=torch.float64)
    coef = (svd.S[lo:].to(torch.float64) * lack).to(Bc.dtype)
    Bm = svd.U[:, lo:].to(device=Bc.device, dtype=Bc.dtype) * coef
    Am = svd.V[:, lo:].T.to(device=Ac.device, dtype=Ac.dtype)
    return torch.cat([Bc, Bm], dim=1), torch.cat([Ac, Am], dim=0)
