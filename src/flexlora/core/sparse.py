"""SLoRA's stage 1: sparse full-parameter changes on fixed random masks, and the hand-over to LoRA.

Paper: S. Babakniya, A. R. Elkordy, Y. H. Ezzeldin, Q. Liu, K.-B. Song, M. El-Khamy,
S. Avestimehr, "SLoRA: Federated Parameter Efficient Fine-Tuning of Language Models",
arXiv 2308.06522 (2023), https://arxiv.org/abs/2308.06522.

Stage 1 trains, for a few rounds, a sparse change of each adapted weight on a fixed random mask
and averages the changes with data-size weights. Stage 2 takes the SVD of the accumulated change
once and starts LoRA from it. Here every client's mask is a prefix of one seeded random
permutation of the module's entries, so masks of different densities are nested: the global
change lives on the largest mask, a client of density ``d`` trains the first ``ceil(d * N)``
entries, and nobody sends a mask. Stage 1 is not discarded (the FlexLoRA reference code does):
stage 2 starts from ``W0 + T_r(change)`` at each client's own ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from flexlora.core.aggregators.base import GlobalState, ModuleState
from flexlora.core.lowrank import LowRankSVD, stable_seed
from flexlora.core.types import AggregationError, lora_scaling

__all__ = ["SparseUpdate", "aggregate_sparse", "dense_change", "lora_share", "mask_counts", "mask_prefix",
           "stage2_state"]

_PREFIX_CACHE: dict[tuple[int, str, int], torch.Tensor] = {}


def lora_share(rank: int, shape: tuple[int, int]) -> float:
    """The share of a module's entries that a rank-``rank`` LoRA trains: ``r (out + in) / (out in)``, at most 1."""
    out_f, in_f = shape
    return min(1.0, rank * (out_f + in_f) / float(out_f * in_f))


def mask_counts(shapes: Mapping[str, tuple[int, int]], density: float | Mapping[str, float]) -> dict[str, int]:
    """Entries per module of a mask of ``density`` (one value, or one per module): ``ceil(d N)``, at least 1."""
    out = {}
    for m, (o, i) in shapes.items():
        d = float(density[m] if isinstance(density, Mapping) else density)
        if not 0.0 < d <= 1.0:
            raise AggregationError(f"module {m!r}: mask density must be in (0, 1], got {d!r}")
        out[m] = max(1, min(o * i, math.ceil(d * o * i)))
    return out


def mask_prefix(module: str, shape: tuple[int, int], count: int, seed: int) -> torch.Tensor:
    """The first ``count`` flat indices of the module's seeded random permutation (int64, on CPU).

    The same ``(module, shape, seed)`` gives the same permutation on every machine, so a mask of
    a smaller count is a prefix of a larger one. Cached per process.
    """
    n = shape[0] * shape[1]
    if not 1 <= count <= n:
        raise AggregationError(f"module {module!r}: mask size {count} outside 1..{n}")
    # One prefix per module, the longest asked for: the smaller masks are views of it.
    key = (seed, module, n)
    hit = _PREFIX_CACHE.get(key)
    if hit is None or hit.shape[0] < count:
        g = torch.Generator().manual_seed(stable_seed("slora-mask", seed, module))
        hit = torch.randperm(n, generator=g)[:count].clone()
        if len(_PREFIX_CACHE) > 4096:
            _PREFIX_CACHE.clear()
        _PREFIX_CACHE[key] = hit
    return hit[:count]


@dataclass
class SparseUpdate:
    """One client's stage-1 reply: the trained change of each module on its mask prefix.

    Attributes
    ----------
    values : mapping module -> 1-D Tensor
        The change at the first ``len(values[m])`` entries of the module's mask permutation.
    num_examples : int
        Its data size (the aggregation weight).
    client_id : str or None
    metadata : dict
    """

    values: Mapping[str, torch.Tensor]
    num_examples: int
    client_id: str | None = None
    metadata: dict = field(default_factory=dict)


def aggregate_sparse(updates: Sequence[SparseUpdate], counts: Mapping[str, int],
                     previous: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The new global change: ``previous + sum_k p_k delta_k`` on the largest mask prefix.

    ``p_k = n_k / sum n``; a client's change is zero beyond its own prefix (the entries it did not
    train), exactly as averaging the clients' full weight changes would give.

    Parameters
    ----------
    updates : sequence of SparseUpdate
    counts : mapping module -> int
        Size of the global prefix per module (the largest client mask of the run).
    previous : mapping module -> Tensor, optional
        The global change so far (``counts[m]`` values per module).
    """
    if not updates:
        raise AggregationError("aggregate_sparse needs at least one update")
    total = sum(int(u.num_examples) for u in updates)
    if total <= 0:
        raise AggregationError("the updates' num_examples sum to zero")
    out = {}
    for m, k in counts.items():
        acc = previous[m].detach().to(torch.float32).clone() if previous is not None else torch.zeros(k)
        if acc.shape != (k,):
            raise AggregationError(f"module {m!r}: the global change holds {tuple(acc.shape)} values, expected ({k},)")
        for i, u in enumerate(updates):
            v = u.values.get(m)
            if v is None or v.dim() != 1 or v.shape[0] > k:
                raise AggregationError(f"update {i} ({u.client_id}): module {m!r} has no valid change "
                                       f"(got {None if v is None else tuple(v.shape)}, at most ({k},))")
            if not torch.isfinite(v).all():
                raise AggregationError(f"update {i} ({u.client_id}): module {m!r} holds NaN or Inf")
            acc[: v.shape[0]] += (u.num_examples / total) * v.detach().to(torch.float32).cpu()
        out[m] = acc
    return out


def dense_change(module: str, shape: tuple[int, int], values: torch.Tensor, seed: int) -> torch.Tensor:
    """The dense ``out x in`` change whose mask-prefix entries are ``values``."""
    idx = mask_prefix(module, shape, int(values.shape[0]), seed)
    flat = torch.zeros(shape[0] * shape[1], dtype=values.dtype)
    flat[idx] = values
    return flat.view(shape)


def stage2_state(changes: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], seed: int, *,
                 then: str, max_rank: int | Mapping[str, int], alpha: float = 16.0, rslora: bool = False,
                 round: int = 1) -> GlobalState:
    """The global state that starts stage 2: the SVD of the accumulated stage-1 change of each module.

    ``then="flexlora"`` keeps the top ``max_rank`` directions, so a client of rank ``r`` receives
    the best rank-``r`` approximation ``T_r(change)`` (Eckart-Young). ``then="fedit"`` (FedAvg's
    state) holds ``T_r(change)`` as factors at the common rank ``max_rank``, split evenly:
    ``B = U sqrt(S) / s``, ``A = sqrt(S) V^T`` with the clients' scaling ``s``.
    """
    modules: dict[str, ModuleState] = {}
    for m, shape in shapes.items():
        d = dense_change(m, shape, changes[m], seed).to(torch.float64)
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        r = int(max_rank[m] if isinstance(max_rank, Mapping) else max_rank)
        r = min(r, S.shape[0])
        U, S, V = U[:, :r].float(), S[:r].float(), Vh[:r].T.float()
        if then == "flexlora":
            modules[m] = ModuleState(shape=shape, svd=LowRankSVD(U, S, V, method="dense"))
        elif then in ("fedit", "fedavg"):
            root = S.sqrt()
            scale = lora_scaling(alpha, r, rslora)
            modules[m] = ModuleState(shape=shape, A=root[:, None] * V.T, B=(U * root) / scale, scale=scale)
        else:
            raise AggregationError(f"slora.then must be 'fedit' or 'flexlora', got {then!r}")
    if then == "flexlora":
        return GlobalState(aggregator="flexlora", modules=modules, round=round)
    extra: dict = {"alpha": float(alpha), "rslora": True} if rslora else {"alpha": float(alpha)}
    return GlobalState(aggregator="fedavg", modules=modules, round=round, extra=extra)
