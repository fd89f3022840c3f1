"""The aggregator interface and the global state an aggregation produces."""

from __future__ import annotations

import dataclasses
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flexlora.core.clipping import (
    ClipRecord,
    GaussianSumNoise,
    check_clip_norm,
    clip_factor,
    clip_factors_towards,
    factor_change_norm,
    product_change_norm,
)
from flexlora.core.lowrank import LowRankSVD, stable_seed, svd_of_product, truncate_to_factors
from flexlora.core.types import (
    AggregationError,
    ClientUpdate,
    Factors,
    RoundRegister,
    check_rank_request,
    lora_scaling_denominator,
    validate_round,
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

    def nonfinite_modules(self) -> list[str]:
        """The modules whose representation holds NaN or Inf (an engine checks this before it
        installs and checkpoints a new global state)."""
        return [m for m, st in self.modules.items()
                if not math.isfinite(st.scale) or not all(bool(torch.isfinite(t).all()) for t in st.tensors().values())]

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


class Aggregator:
    """Server-side aggregation of LoRA client updates.

    Subclasses implement :meth:`begin_round` (their :class:`RoundAccumulator` holds the
    aggregation maths, once); :meth:`aggregate` is that streaming fold run over a list.
    :meth:`distribute` has a default that sends each client the best rank-``r`` approximation
    (Eckart-Young) of the global update.
    """

    name: str = "base"
    # True for aggregators that average A and B separately: their clients must share one start.
    averages_factors: bool = False

    def __init__(self, *, split: str = "B", check_finite: bool = True, seed: int = 0,
                 clip_norm: float | None = None) -> None:
        if split not in ("B", "A", "sqrt"):
            raise AggregationError(f"split must be 'B', 'A' or 'sqrt', got {split!r}")
        self.split = split
        self.check_finite = check_finite
        self.seed = seed
        self.clip_norm = check_clip_norm(clip_norm)

    def sent_factors(self, previous: GlobalState | None, update: ClientUpdate) -> dict[str, Factors] | None:
        """What a client of ``update``'s ranks, alpha and scaling was sent from ``previous``: the
        reference its contribution is measured from when clipping (:mod:`flexlora.core.clipping`).

        The default is :meth:`distribute` of ``previous`` (None without a previous state: the client
        started from a zero product, or, for factor averaging, from zero factors; pass ``sent=``
        to :meth:`RoundAccumulator.add` where the clients started from a shared fresh adapter).
        """
        if previous is None or any(m not in previous.modules for m in update.factors):
            return None
        return self.distribute(previous, {m: update.rank(m) for m in update.factors}, update.alpha,
                               rslora=update.rslora)

    def aggregate(self, updates: Sequence[ClientUpdate], previous: GlobalState | None = None, *,
                  sent: Sequence[Mapping[str, Factors] | None] | None = None) -> GlobalState:
        """Combine one round of client updates into the global state.

        The whole round is validated first (so a bad round is refused before anything is
        computed), then folded through :meth:`begin_round`'s accumulator in list order: the
        result is exactly what streaming the same updates gives.

        Parameters
        ----------
        updates : sequence of ClientUpdate
            The round's clients; weights are ``p_k = n_k / sum_j n_j`` over these clients.
        previous : GlobalState or None
            The state before this round. Only aggregators whose clients send increments
            (FLoRA) or that keep a server memory (FlexLoRA's ``remedy="server-memory"``) use it,
            and clipping (``clip_norm``) measures each contribution from what it sent.
        sent : sequence of (mapping module -> (A0, B0)) or None, optional
            With ``clip_norm``: the factors each client started from (default:
            :meth:`sent_factors` of ``previous``).

        Returns
        -------
        GlobalState

        Raises
        ------
        AggregationError
            For a malformed round (see :func:`~flexlora.core.types.validate_round`), a ``previous``
            that is not a :class:`GlobalState`, or a round the aggregator cannot combine.
        """
        shapes = validate_round(updates, check_finite=self.check_finite)
        if sent is not None and len(sent) != len(updates):
            raise AggregationError(f"sent gives {len(sent)} starting points for {len(updates)} updates")
        return self._fold_round(updates, shapes, previous, sent)

    def _fold_round(
        self, updates: Sequence[ClientUpdate], shapes: dict[str, tuple[int, int]], previous: GlobalState | None,
        sent: Sequence[Mapping[str, Factors] | None] | None = None,
    ) -> GlobalState:
        """Fold ``updates``, already validated as one round of modules ``shapes``, through a fresh
        accumulator.

        The updates' own ranks are the planned ranks (only FlexLoRA's rank partitioning reads
        them). Each update skips :meth:`RoundAccumulator.add`'s checks, which are the per-update
        part of the validation the round has passed, so nothing is checked twice.
        """
        acc = self.begin_round(previous, ranks=[{m: u.rank(m) for m in shapes} for u in updates])
        return _fold_into(acc, updates, shapes, sent).finish()

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
        check_state(state, self.name)
        _check_alpha(alpha)
        _check_rslora(rslora)
        ranks = check_rank_request(rank, state.shapes)
        self._check_ranks(state, ranks)
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

    def _check_ranks(self, state: GlobalState, ranks: Mapping[str, int]) -> None:
        """Refuse ranks this aggregator's state cannot serve exactly (none by default)."""
        return None

    def _module_svd(self, state: GlobalState, module: str) -> LowRankSVD:
        key = ("svd", module)
        if key not in state._cache:
            state._cache[key] = state.modules[module].to_svd()
        return state._cache[key]

    def begin_round(
        self, previous: GlobalState | None = None, *, ranks: Sequence[Mapping[str, int]] | None = None
    ) -> RoundAccumulator:
        """Start a streaming aggregation of one round (the one interface every engine uses).

        Feed each client update to :meth:`RoundAccumulator.add` as it arrives and call
        :meth:`RoundAccumulator.finish` once; the result equals ``aggregate(updates, previous)``
        (exactly in the list's order, to float32 accuracy in any other). The built-in aggregators
        fold each update into running sums as it is added, so the server never holds the round's
        updates together. This default, for a subclass that implements :meth:`aggregate` instead,
        keeps them until ``finish`` and aggregates them there.

        Parameters
        ----------
        previous : GlobalState or None
            The state the round's clients were sent, as for :meth:`aggregate`.
        ranks : sequence of mapping, optional
            The ranks ``{module: r}`` of every client that may reply this round (a superset is
            fine). Only FlexLoRA's ``remedy="rank-partitioned"`` needs it to stream.

        Raises
        ------
        NotImplementedError
            The subclass implements neither this nor :meth:`aggregate` (each is defined by the other).
        """
        if type(self).aggregate is Aggregator.aggregate:
            raise NotImplementedError(f"{type(self).__name__} must implement begin_round() (or aggregate()): the "
                                      "base class defines each through the other")
        return BufferedAccumulator(self, previous)

    def summary(self) -> str:
        """One line naming the aggregator and its settings."""
        settings = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()) if not k.startswith("_"))
        return f"{self.name}({settings})"


class RoundAccumulator(ABC):
    """One round's aggregation, fed one client update at a time (from :meth:`Aggregator.begin_round`).

    :meth:`add` validates the update on its own and against the round's first update (modules
    and shapes), so a bad update is refused with the same error ``aggregate`` gives and leaves
    the running aggregate untouched; :meth:`finish` returns the round's :class:`GlobalState`.

    With a bound ``clip_norm`` (the aggregator's, or set on the accumulator before the first add),
    each update's contribution is brought within it before it is folded
    (:mod:`flexlora.core.clipping`); :attr:`clip_log` keeps one :class:`ClipRecord` per update.
    With :attr:`noise` (a :class:`~flexlora.core.clipping.GaussianSumNoise`, set before the first
    add, together with ``clip_norm``) the round is client-level differentially private: uniform
    weights, Gaussian noise on each module's sum, a fixed denominator.
    """

    #: True for an accumulator that adds :attr:`noise` to its sums (the others refuse it).
    supports_noise: bool = False

    #: True for an accumulator of products that folds a clipped contribution itself (from
    #: ``self._clip``); otherwise :meth:`_take` hands ``_fold`` an equivalent clipped update.
    folds_clipped_products: bool = False

    def __init__(self, aggregator: Aggregator, previous: GlobalState | None) -> None:
        check_previous(previous)
        self.aggregator = aggregator
        self.previous = previous
        self.shapes: dict[str, tuple[int, int]] | None = None
        self.count = 0
        self.total_examples = 0
        self._finished = False
        self._register = RoundRegister()  # clients and precision taken in so far, across the adds
        # Set by add() for _fold: whether what it keeps of an update must be a copy (add's `copy`).
        self._copy = True
        self.clip_norm: float | None = aggregator.clip_norm
        self.clip_log: list[ClipRecord] = []
        self.noise: GaussianSumNoise | None = None
        # Set by _take for an accumulator that folds clipped products: (scale c, factors sent).
        self._clip: tuple[float, Mapping[str, Factors] | None] = (1.0, None)

    def add(self, update: ClientUpdate, *, copy: bool = True, sent: Mapping[str, Factors] | None = None) -> None:
        """Fold ``update`` into the round's aggregate.

        Parameters
        ----------
        update : ClientUpdate
        copy : bool, default True
            Keep copies of whatever of ``update`` the round holds on to, so the caller may reuse or
            change its tensors once ``add`` returns. ``False`` lets the round keep references
            instead (no transient copy of a reply): for a caller that never touches the update
            again, as the engines do.
        sent : mapping module -> (A0, B0), optional
            With a ``clip_norm``: the factors the client started from, at its ranks and for its
            scaling (default :meth:`Aggregator.sent_factors` of the round's ``previous``).

        Raises
        ------
        AggregationError
            The update is malformed, holds NaN/Inf, or does not match the round's modules and shapes.
        """
        if self._finished:
            raise AggregationError("this round's aggregation is finished; start the next with begin_round()")
        label = update.label(self.count) if isinstance(update, ClientUpdate) else f"client {self.count}"
        try:
            shapes = validate_round([update], check_finite=self.aggregator.check_finite)
        except AggregationError as exc:
            # Name the update by its position in the round, not as "client 0" of a round of one.
            msg, first = str(exc), update.label(0) if isinstance(update, ClientUpdate) else "client 0"
            raise AggregationError(label + msg[len(first):] if msg.startswith(first) else msg) from None
        self.add_checked(update, shapes, copy=copy, sent=sent)

    def add_checked(self, update: ClientUpdate, shapes: Mapping[str, tuple[int, int]], *, copy: bool = True,
                    sent: Mapping[str, Factors] | None = None) -> None:
        """:meth:`add` for an update that has passed :func:`~flexlora.core.types.validate_round` on
        its own already (a server that checked the reply when it arrived), so nothing is checked
        twice: only the checks across the round's clients (same client or update twice, mixed
        precision, other modules or shapes) run here.

        Parameters
        ----------
        update : ClientUpdate
        shapes : mapping module -> (out, in)
            The update's modules, in the order of ``update.factors``, as ``validate_round`` gives.
        copy : bool, default True
            As in :meth:`add`.
        sent : mapping module -> (A0, B0), optional
            As in :meth:`add`.
        """
        if self._finished:
            raise AggregationError("this round's aggregation is finished; start the next with begin_round()")
        shapes = dict(shapes)
        label = update.label(self.count)
        self._register.check(update, label, self.count)
        if self.shapes is not None and shapes != self.shapes:
            missing = sorted(set(self.shapes) - set(shapes))
            extra = sorted(set(shapes) - set(self.shapes))
            if missing or extra:
                raise AggregationError(
                    f"{label}: its modules differ from the round's first client's (missing: {missing[:5]}, "
                    f"extra: {extra[:5]}). Every client of a round must send the same set of LoRA modules."
                )
            bad = next(m for m in shapes if shapes[m] != self.shapes[m])
            raise AggregationError(
                f"{label}, module {bad!r}: shape {shapes[bad]} (out, in) differs from {self.shapes[bad]} in earlier "
                "clients. All clients must adapt the same base model."
            )
        self._take(update, label, shapes, copy=copy, sent=sent)

    def _take(self, update: ClientUpdate, label: str, shapes: dict[str, tuple[int, int]], *, copy: bool,
              sent: Mapping[str, Factors] | None = None) -> None:
        """Fold in ``update`` (the round's client ``label``, of modules ``shapes``), already checked:
        by :meth:`add`, or with its whole round by :meth:`Aggregator.aggregate`."""
        first = self.shapes is None
        if first:
            self.shapes = shapes
        self._copy = copy
        record, given = None, update
        try:
            if self.noise is not None:
                self._check_noise()
            with torch.no_grad():  # a caller's factors that require grad leave no graph in the state
                if self.clip_norm is not None:
                    update, record = self._clipped(update, label, sent)
                if self.noise is not None:
                    # Uniform weights under DP: every client counts one (n_k would leak, and weigh
                    # one client above the sensitivity bound).
                    update = dataclasses.replace(update, num_examples=1)
                self._fold(update, label)
        except BaseException:
            if first:
                self.shapes = None  # a refused first update does not set the round's modules
            raise
        finally:
            self._clip = (1.0, None)
        if record is not None:
            self.clip_log.append(record)
        self._register.record(given, self.count)
        self.count += 1
        self.total_examples += int(update.num_examples)

    def _check_noise(self) -> None:
        name = self.aggregator.name
        if not isinstance(self.noise, GaussianSumNoise):
            raise AggregationError(f"noise must be a GaussianSumNoise, got {type(self.noise).__name__}")
        if not self.supports_noise:
            raise AggregationError(f"{name} cannot add differential-privacy noise to its round (its weights or its "
                                   "fold do not have the bounded sensitivity DP needs); use flexlora, fedavg or flora")
        if self.clip_norm is None:
            raise AggregationError("noise needs a clip_norm: without a bound on each contribution the noise "
                                   "protects nothing")
        if self.count >= self.noise.clients:
            raise AggregationError(f"more updates ({self.count + 1}) than the noise's {self.noise.clients} clients: "
                                   "the denominator must be the round's number of sampled clients")

    def _denominator(self, total: float) -> float:
        """What a sum of ``total`` example weights is divided by: the fixed number of sampled
        clients under DP noise, else ``total``."""
        return float(self.noise.clients) if self.noise is not None else total

    def _clipped(self, update: ClientUpdate, label: str,
                 sent: Mapping[str, Factors] | None) -> tuple[ClientUpdate, ClipRecord]:
        """``update`` with its contribution brought within ``clip_norm`` (module docstring of
        :mod:`flexlora.core.clipping`), and the record of what was done."""
        bound = check_clip_norm(self.clip_norm)
        assert bound is not None
        agg = self.aggregator
        if sent is None:
            sent = agg.sent_factors(self.previous, update)
        if sent is not None:
            _check_sent(sent, update, label)
        if agg.averages_factors:
            norm = factor_change_norm(update.factors, sent)
        else:
            norm = product_change_norm(update.factors, {m: update.scale(m) for m in update.factors}, sent)
        if not math.isfinite(norm):
            raise AggregationError(f"{label}: its contribution's norm is not finite ({norm}); it cannot be bounded")
        c = clip_factor(norm, bound)
        if agg.averages_factors:
            if c < 1.0:
                update = dataclasses.replace(update, factors=clip_factors_towards(update.factors, sent, c))
        elif self.folds_clipped_products:
            self._clip = (c, sent)
        elif c < 1.0:
            update = _clipped_product_update(update, sent, c)
        return update, ClipRecord(client=update.client_id or label, norm=norm, bound=bound, factor=c)

    def finish(self) -> GlobalState:
        """The round's global state.

        Raises
        ------
        AggregationError
            No update was added.
        """
        if self._finished:
            raise AggregationError("this round's aggregation is already finished (finish() returns its state "
                                   "once); start the next round with begin_round()")
        if self.count == 0:
            raise AggregationError("empty round: add at least one ClientUpdate before finish()")
        self._finished = True
        with torch.no_grad():
            return self._finish()

    def _next_round(self) -> int:
        return (self.previous.round + 1) if self.previous is not None else 1

    @abstractmethod
    def _fold(self, update: ClientUpdate, label: str) -> None:
        """Fold a validated update in (raise AggregationError, before changing anything, to refuse it).

        Whatever it keeps of ``update``'s tensors must be a copy when ``self._copy`` is set."""

    @abstractmethod
    def _finish(self) -> GlobalState:
        """The state from everything folded."""


class BufferedAccumulator(RoundAccumulator):
    """Keeps the round's updates until :meth:`finish` (memory grows with the clients).

    The default of :meth:`Aggregator.begin_round`, where ``finish`` calls the subclass's own
    ``aggregate``; and FlexLoRA's rank-partitioned round without planned ranks, which ``finish``
    folds through a streaming accumulator planned with the ranks that replied.
    """

    def __init__(self, aggregator: Aggregator, previous: GlobalState | None) -> None:
        super().__init__(aggregator, previous)
        self.updates: list[ClientUpdate] = []
        self.sent: list[Mapping[str, Factors] | None] = []

    def _own_aggregate(self) -> bool:
        return type(self.aggregator).aggregate is not Aggregator.aggregate

    def _take(self, update: ClientUpdate, label: str, shapes: dict[str, tuple[int, int]], *, copy: bool,
              sent: Mapping[str, Factors] | None = None) -> None:
        if self._own_aggregate():
            # The subclass's aggregate() folds what it is given: clip here.
            super()._take(update, label, shapes, copy=copy, sent=sent)
            return
        # The fold at finish() clips each update (the accumulator that knows how), so not here.
        bound, self.clip_norm = self.clip_norm, None
        try:
            super()._take(update, label, shapes, copy=copy)
        finally:
            self.clip_norm = bound
        self.sent.append(sent)

    def _fold(self, update: ClientUpdate, label: str) -> None:
        if self._copy:
            update = dataclasses.replace(update, factors={m: (a.clone(), b.clone()) for m, (a, b) in
                                                          update.factors.items()})
        self.updates.append(update)

    def _finish(self) -> GlobalState:
        updates, self.updates = self.updates, []
        agg = self.aggregator
        if self._own_aggregate():
            return agg.aggregate(updates, self.previous)
        # add() has checked every update against the round already: fold them unchecked.
        assert self.shapes is not None
        acc = agg.begin_round(self.previous, ranks=[{m: u.rank(m) for m in self.shapes} for u in updates])
        acc.clip_norm = self.clip_norm
        _fold_into(acc, updates, self.shapes, self.sent)
        self.clip_log = acc.clip_log
        return acc.finish()


def _fold_into(acc: RoundAccumulator, updates: Sequence[ClientUpdate], shapes: dict[str, tuple[int, int]],
               sent: Sequence[Mapping[str, Factors] | None] | None) -> RoundAccumulator:
    """Fold ``updates``, checked already as one round of modules ``shapes``, into ``acc``."""
    for i, u in enumerate(updates):
        # No copies: the caller's updates outlive this call, and every accumulator builds its
        # state in new tensors, so the result shares no storage with them.
        acc._take(u, u.label(i), shapes, copy=False, sent=sent[i] if sent is not None else None)
    return acc


def _check_sent(sent: Mapping[str, Factors], update: ClientUpdate, label: str) -> None:
    for m, (a, b) in update.factors.items():
        if m not in sent:
            continue
        a0, b0 = sent[m]
        if tuple(a0.shape) != tuple(a.shape) or tuple(b0.shape) != tuple(b.shape):
            raise AggregationError(f"{label}, module {m!r}: the factors it was sent (A{tuple(a0.shape)}, "
                                   f"B{tuple(b0.shape)}) do not match its update's (A{tuple(a.shape)}, "
                                   f"B{tuple(b.shape)}); pass sent= at the client's own ranks")


def _clipped_product_update(update: ClientUpdate, sent: Mapping[str, Factors] | None, c: float) -> ClientUpdate:
    """An update whose product is ``T + c (s B A - T)`` with ``T = s B0 A0`` (what was sent), for an
    accumulator of products that does not fold clipped contributions itself.

    Without ``sent`` it is ``c s B A``: ``B`` scaled, the rank unchanged. With it the product
    ``c s B A + (1 - c) s B0 A0`` needs rank ``2 r``: ``A' = [A; A0]``, ``B' = [c B, (1 - c) B0] s / s'``
    with the scaling ``s'`` of rank ``2 r``.
    """
    factors: dict[str, Factors] = {}
    for m, (a, b) in update.factors.items():
        if sent is None or m not in sent or not (bool(sent[m][0].any()) and bool(sent[m][1].any())):
            factors[m] = (a, b * c)  # nothing (a zero product) was sent
            continue
        a0, b0 = (t.to(device=a.device, dtype=a.dtype) for t in sent[m])
        r = a.shape[0]
        k = lora_scaling_denominator(2 * r, update.rslora) / lora_scaling_denominator(r, update.rslora)
        factors[m] = (torch.cat([a, a0], dim=0), torch.cat([b * (c * k), b0 * ((1.0 - c) * k)], dim=1))
    return dataclasses.replace(update, factors=factors)


def check_previous(previous: Any) -> None:
    """``previous`` must be a :class:`GlobalState` (the one ``aggregate`` returned last round) or None."""
    if previous is not None and not isinstance(previous, GlobalState):
        raise AggregationError(f"previous must be the GlobalState of the last round (or None in the first), "
                               f"got {type(previous).__name__}")


def check_state(state: Any, aggregator: str, *, factors: bool = False) -> None:
    """``state`` must be a :class:`GlobalState`; with ``factors``, one held as factors (A, B), as
    FedAvg's and HetLoRA's are (they truncate or pass on factors, not an SVD)."""
    if not isinstance(state, GlobalState):
        raise AggregationError(f"{aggregator}.distribute needs the GlobalState that aggregate() returned, got "
                               f"{type(state).__name__}")
    if factors:
        odd = [m for m, st in state.modules.items() if st.A is None or st.B is None]
        if odd:
            raise AggregationError(f"{aggregator}.distribute needs a state of factors (A, B), as {aggregator}'s "
                                   f"aggregate() makes; this one ({state.aggregator!r}) holds an SVD for {odd[:3]}")


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

    The stack of a whole round at once, for checks and analysis of a round's SVD; the aggregators
    themselves build theirs client by client (:class:`~flexlora.core.lowrank_sum.LowRankSum`).

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
