"""The aggregator interface and the global state an aggregation produces."""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flexlora.core.lowrank import LowRankSVD, stable_seed, svd_of_product, truncate_to_factors
from flexlora.core.types import (
    AggregationError,
    ClientUpdate,
    Factors,
    check_rank_request,
    lora_scaling_denominator,
)


@dataclass
class ModuleState:
    """The global update of one module, in one of three exact representations.

    Exactly one of the groups is set:

    - ``svd``: a thin SVD ``U diag(S) V^T`` (FlexLoRA);
    - ``A``/``B`` with ``scale``: factors whose effective update is ``scale * B @ A``
      (FedAvg, HetLoRA, FLoRA's stacked factors).
    """

    shape: tuple[int, int]
    svd: LowRankSVD | None = None
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    scale: float = 1.0

    def dense(self) -> torch.Tensor:
        """The dense ``out x in`` global update of this module."""
        if self.svd is not None:
            return self.svd.dense()
        assert self.A is not None and self.B is not None
        return self.scale * (self.B @ self.A)

    @property
    def rank(self) -> int:
        """Rank held by the representation (an upper bound on the update's rank)."""
        if self.svd is not None:
            return int(self.svd.S.shape[0])
        assert self.A is not None
        return int(self.A.shape[0])

    def to_svd(self, *, max_rank: int | None = None) -> LowRankSVD:
        """An exact thin SVD of this module's update (computed from the factors when needed)."""
        if self.svd is not None:
            return self.svd
        assert self.A is not None and self.B is not None
        return svd_of_product(self.B * self.scale, self.A, max_rank=max_rank)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.svd is not None:
            return {"U": self.svd.U, "S": self.svd.S, "V": self.svd.V}
        assert self.A is not None and self.B is not None
        return {"A": self.A, "B": self.B}


@dataclass
class GlobalState:
    """The server's global adapter after a round: one :class:`ModuleState` per module.

    ``aggregator`` names the aggregator that made it; ``round`` counts aggregations;
    ``extra`` holds small plain values (e.g. FedAvg's common rank and alpha).
    """

    aggregator: str
    modules: dict[str, ModuleState]
    round: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def dense(self, module: str) -> torch.Tensor:
        """Dense global update of ``module`` (``out x in``)."""
        if module not in self.modules:
            raise KeyError(f"module {module!r} is not in the global state; known: {sorted(self.modules)[:5]}...")
        return self.modules[module].dense()

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m: s.shape for m, s in self.modules.items()}

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (for ``torch.save``/safetensors checkpoints)."""
        mods = {}
        for name, st in self.modules.items():
            entry: dict[str, Any] = {"shape": list(st.shape), "scale": st.scale, "tensors": st.tensors()}
            if st.svd is not None:
                entry["method"] = st.svd.method
            mods[name] = entry
        return {"aggregator": self.aggregator, "round": self.round, "extra": dict(self.extra), "modules": mods}

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any]) -> GlobalState:
        """Inverse of :meth:`state_dict`; validates the structure."""
        try:
            modules = {}
            for name, entry in sd["modules"].items():
                t = entry["tensors"]
                shape = (int(entry["shape"][0]), int(entry["shape"][1]))
                if "U" in t:
                    svd = LowRankSVD(t["U"], t["S"], t["V"], entry.get("method", "qr"))
                    k = svd.S.shape[0] if svd.S.ndim == 1 else -1
                    if svd.U.shape != (shape[0], k) or svd.V.shape != (shape[1], k):
                        raise ValueError(f"module {name!r}: SVD factors do not match shape {shape}")
                    modules[name] = ModuleState(shape=shape, svd=svd)
                else:
                    A, B = t["A"], t["B"]
                    if B.shape[0] != shape[0] or A.shape[1] != shape[1] or A.shape[0] != B.shape[1]:
                        raise ValueError(f"module {name!r}: factors do not match shape {shape}")
                    modules[name] = ModuleState(shape=shape, A=A, B=B, scale=float(entry["scale"]))
            return cls(aggregator=str(sd["aggregator"]), modules=modules, round=int(sd["round"]), extra=dict(sd["extra"]))
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"malformed global state: {exc!r}") from exc


class Aggregator(ABC):
    """Server-side aggregation of LoRA client updates.

    Subclasses implement :meth:`aggregate`; :meth:`distribute` has a default that sends each
    client the best rank-``r`` approximation (Eckart-Young) of the global update.
    """

    name: str = "base"

    def __init__(self, *, split: str = "B", check_finite: bool = True, seed: int = 0) -> None:
        if split not in ("B", "A", "sqrt"):
            raise AggregationError(f"split must be 'B', 'A' or 'sqrt', got {split!r}")
        self.split = split
        self.check_finite = check_finite
        self.seed = seed

    @abstractmethod
    def aggregate(self, updates: Sequence[ClientUpdate], previous: GlobalState | None = None) -> GlobalState:
        """Combine one round of client updates into the global state.

        Parameters
        ----------
        updates : sequence of ClientUpdate
            The round's clients; weights are ``p_k = n_k / sum_j n_j`` over these clients.
        previous : GlobalState or None
            The state before this round. Only aggregators whose clients send increments
            (FLoRA) use it; the others ignore it.
        """

    def distribute(
        self, state: GlobalState, rank: int | Mapping[str, int], alpha: float = 16.0, *, rslora: bool = False
    ) -> dict[str, Factors]:
        """Factors ``{module: (A, B)}`` for a client of ``rank`` (one int, or one per module).

        The effective update ``s B @ A`` of each module, with the receiving client's scaling
        ``s = alpha / r`` (``alpha / sqrt(r)`` when ``rslora``), is the best rank-``r``
        approximation of the global update. Truncations are cached per distinct
        ``(module, rank, alpha, rslora)``, so sending the same rank to many clients costs one
        truncation; each call returns fresh copies.

        Parameters
        ----------
        state : GlobalState
        rank : int or mapping of str to int
        alpha : float, default 16.0
            The receiving client's LoRA alpha.
        rslora : bool, default False
            The receiving client scales its update by ``alpha / sqrt(r)`` (rsLoRA).

        Returns
        -------
        dict of str to (Tensor, Tensor)
        """
        _check_alpha(alpha)
        _check_rslora(rslora)
        ranks = check_rank_request(rank, state.shapes)
        out: dict[str, Factors] = {}
        for m, r in ranks.items():
            key = (m, r, float(alpha), self.split, rslora)
            if key not in state._cache:
                svd = self._module_svd(state, m)
                state._cache[key] = truncate_to_factors(
                    svd, r, alpha, split=self.split, pad_seed=stable_seed(self.seed, m, r),  # type: ignore[arg-type]
                    rslora=rslora,
                )
            a, b = state._cache[key]
            # Clones: a caller that trains the factors in place must not alter the cache
            # that the next client of the same rank receives.
            out[m] = (a.clone(), b.clone())
        return out

    def _module_svd(self, state: GlobalState, module: str) -> LowRankSVD:
        key = ("svd", module)
        if key not in state._cache:
            state._cache[key] = state.modules[module].to_svd()
        return state._cache[key]

    def summary(self) -> str:
        """One line naming the aggregator and its settings."""
        settings = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()) if not k.startswith("_"))
        return f"{self.name}({settings})"


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (0 < alpha < math.inf):
        raise AggregationError(f"alpha must be a positive finite number, got {alpha!r}")


def _check_rslora(rslora: bool) -> None:
    # Strict: a truthy non-bool (the string "false") would silently change the scaling.
    if not isinstance(rslora, bool):
        raise AggregationError(f"rslora must be True or False, got {rslora!r}")


def scaled_stack(
    updates: Sequence[ClientUpdate], module: str, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Bc, Ac)`` with ``Bc = [p_k s_k B_k]`` (``out x R``) and ``Ac = [A_k]`` (``R x in``).

    ``Bc @ Ac == sum_k p_k s_k B_k A_k`` with each client's own scaling ``s_k = alpha_k / r_k``
    (``alpha_k / sqrt(r_k)`` for a client with ``rslora``). Each client's coefficient is formed
    in float64 before it scales ``B_k``.
    """
    first_a = updates[0].factors[module][0]
    dtype = first_a.dtype if first_a.dtype == torch.float64 else torch.float32
    device = first_a.device
    bs, as_ = [], []
    for w, u in zip(weights.tolist(), updates):
        a, b = u.factors[module]
        # (w * alpha) / denominator, the rounding order this coefficient always had.
        coef = w * float(u.alpha) / lora_scaling_denominator(a.shape[0], u.rslora)
        bs.append(b.to(device=device, dtype=dtype).T * coef)
        as_.append(a.to(device=device, dtype=dtype))
    # Bc is returned column-major (the transpose of a row-major R x out stack), the layout LAPACK's
    # QR wants; it is the same matrix either way.
    return torch.cat(bs, dim=0).T, torch.cat(as_, dim=0)


def dense_update(state: GlobalState, module: str) -> torch.Tensor:
    """The dense global update ``out x in`` of ``module`` (for tests, analysis and export).

    For FlexLoRA it is the full-size weighted average ``sum_k p_k s_k B_k A_k``
    of the last round, exactly (up to float rounding) when the state keeps its full rank.
    """
    return state.dense(module)
