"""Plain-tensor types shared by every aggregator, and the validation of client updates.

A LoRA module holds two factors: ``A`` with shape ``(r, in_features)`` and ``B`` with shape
``(out_features, r)``; the module's effective update is ``s * B @ A`` with the LoRA scaling
``s = alpha / r``, or ``s = alpha / sqrt(r)`` under rsLoRA (Kalajdzievski, 2023,
https://arxiv.org/abs/2312.03732). :func:`lora_scaling` is the one place that formula lives.
"""

from __future__ import annotations

import math
import numbers
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

Factors = tuple[torch.Tensor, torch.Tensor]
"""``(A, B)`` with ``A: r x in`` and ``B: out x r``."""


def lora_scaling_denominator(rank: int, rslora: bool = False) -> float:
    """The divisor of ``alpha`` in the LoRA scaling: ``r``, or ``sqrt(r)`` under rsLoRA.

    Parameters
    ----------
    rank : int
        The module's LoRA rank (positive).
    rslora : bool, default False
        Rank-stabilised scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.

    Returns
    -------
    float
        ``float(rank)`` or ``math.sqrt(rank)``.

    Notes
    -----
    Callers that need ``alpha / r`` folded into a longer product (``w * alpha / r``) or its
    inverse (``r / alpha``) divide by this value instead of multiplying by :func:`lora_scaling`,
    so that with ``rslora=False`` every float operation, and thus every result, is the same as
    before rsLoRA existed.
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not isinstance(rslora, bool):
        raise ValueError(f"rslora must be True or False, got {rslora!r}")
    return math.sqrt(rank) if rslora else float(rank)


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA scaling of a module: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

    PEFT applies the same formula (``LoraConfig(use_rslora=...)``), so factors exported with the
    flag reproduce the effective update ``lora_scaling(alpha, r, rslora) * B @ A``.

    Parameters
    ----------
    alpha : float
        LoRA alpha (positive).
    rank : int
        The module's rank (positive).
    rslora : bool, default False
        Rank-stabilised LoRA (Kalajdzievski, 2023): the update of a rank-200 adapter is then not
        25 times smaller than that of a rank-8 one at the same alpha.

    Returns
    -------
    float
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < math.inf:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    return float(alpha) / lora_scaling_denominator(rank, rslora)


class AggregationError(ValueError):
    """A client update or a request the aggregator cannot accept.

    The message names the client (by its position in the round) and the module, and says how
    to fix the input. It subclasses ``ValueError`` so callers that catch bad input generically
    still catch it.
    """


@dataclass
class ClientUpdate:
    """One client's contribution to a round.

    Parameters
    ----------
    factors : Mapping[str, tuple[Tensor, Tensor]]
        Module name -> ``(A, B)``, ``A`` of shape ``(r, in)`` and ``B`` of shape ``(out, r)``.
        The rank ``r`` is read from the shapes; it may differ per module and per client.
    num_examples : int
        Number of local training examples; sets the client's weight ``p_k = n_k / sum_j n_j``.
    alpha : float, default 16.0
        LoRA scaling numerator of this client: the effective update is ``(alpha / r) B @ A``.
    client_id : str or None, default None
        Used in error messages and logs only.
    metadata : dict
        Free-form values (type name, train loss); the aggregators ignore them.
    rslora : bool, default False
        The client trained with rsLoRA scaling: its effective update is ``(alpha / sqrt(r)) B @ A``.
        Last, so that positional construction of the other fields is unchanged.
    """

    factors: Mapping[str, Factors]
    num_examples: int
    alpha: float = 16.0
    client_id: str | None = None
    metadata: dict = field(default_factory=dict)
    rslora: bool = False

    def rank(self, module: str) -> int:
        """Rank of ``module`` in this update (rows of its ``A`` factor)."""
        return int(self.factors[module][0].shape[0])

    def scale(self, module: str) -> float:
        """LoRA scaling of ``module``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return lora_scaling(self.alpha, self.rank(module), self.rslora)

    def label(self, index: int) -> str:
        return f"client {index}" + (f" ({self.client_id!r})" if self.client_id is not None else "")


MAX_EXAMPLES = 2**53
"""Largest accepted ``num_examples``: weights are computed in float64, exact for integers up to it."""

MAX_UPDATE_NORM = 1e30
"""Largest accepted bound ``(alpha/r) ||B||_F ||A||_F`` on a client's effective update of one module.

Beyond it the server's float32 products (the QR core ``R_B R_A^T``, a dense sum of several
clients) can overflow float32's 3.4e38 into Inf, and one client would turn the global adapter
into Inf for everyone. Trained adapters are many orders of magnitude below it (a float32
model's weights stay below about 1e4); only a corrupted or malicious update comes near it.
"""


def validate_round(updates: Sequence[ClientUpdate], *, check_finite: bool = True) -> dict[str, tuple[int, int]]:
    """Check a round's updates and return ``{module: (out_features, in_features)}``.

    Raises
    ------
    AggregationError
        For an empty round, the same client twice, factors that are not floating point or mix
        float64 with lower precisions, a non-positive or non-integer ``num_examples``, a non-positive or
        non-finite ``alpha``, a non-bool ``rslora``, factors whose shapes do not chain (``A: r x in``, ``B: out x r``),
        a module missing in some clients, a module whose shape differs across clients, a rank
        of zero or above ``min(out, in)``, or (with ``check_finite``) NaN/Inf values or an
        update too large for float32 (:data:`MAX_UPDATE_NORM`).
    """
    if isinstance(updates, ClientUpdate) or not isinstance(updates, Sequence):
        raise AggregationError(f"expected a sequence (list) of ClientUpdate, got {type(updates).__name__}; "
                               "pass [update] for a round of one")
    if len(updates) == 0:
        raise AggregationError("empty round: aggregate() needs at least one ClientUpdate")
    shapes: dict[str, tuple[int, int]] = {}
    first_modules: set[str] | None = None
    register = RoundRegister()
    for i, u in enumerate(updates):
        who = u.label(i) if isinstance(u, ClientUpdate) else f"client {i}"
        if not isinstance(u, ClientUpdate):
            raise AggregationError(f"{who}: expected a flexlora.ClientUpdate, got {type(u).__name__}")
        n = u.num_examples
        if isinstance(n, bool) or not isinstance(n, numbers.Real) or not (0 < n <= MAX_EXAMPLES) or n != int(n):
            raise AggregationError(
                f"{who}: num_examples must be a positive integer up to 2**53 (it sets the client's weight), got {n!r}"
            )
        if not isinstance(u.factors, Mapping):
            raise AggregationError(f"{who}: factors must be a mapping {{module name: (A, B)}}, got "
                                   f"{type(u.factors).__name__}")
        if isinstance(u.alpha, bool) or not isinstance(u.alpha, numbers.Real) or not math.isfinite(u.alpha) or u.alpha <= 0:
            raise AggregationError(f"{who}: alpha must be a positive finite number, got {u.alpha!r}")
        if not isinstance(u.rslora, bool):
            # A truthy string such as "false" would silently switch the scaling.
            raise AggregationError(f"{who}: rslora must be True or False, got {u.rslora!r}")
        if len(u.factors) == 0:
            raise AggregationError(f"{who}: the update holds no modules")
        modules = set(u.factors)
        if first_modules is None:
            first_modules = modules
        elif modules != first_modules:
            missing = sorted(first_modules - modules)
            extra = sorted(modules - first_modules)
            raise AggregationError(
                f"{who}: its modules differ from client 0's (missing: {missing[:5]}, extra: {extra[:5]}). "
                "Every client of a round must send the same set of LoRA modules."
            )
        for name, pair in u.factors.items():
            if not (isinstance(pair, tuple | list) and len(pair) == 2):
                raise AggregationError(f"{who}, module {name!r}: factors must be a pair (A, B)")
            a, b = pair
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
                raise AggregationError(f"{who}, module {name!r}: A and B must be torch tensors")
            for t, what in ((a, "A"), (b, "B")):
                if not t.is_floating_point():
                    raise AggregationError(f"{who}, module {name!r}: factor {what} has dtype {t.dtype}; LoRA factors "
                                           "must be floating point (float16, bfloat16, float32 or float64)")
                if t.device.type == "meta":
                    raise AggregationError(f"{who}, module {name!r}: factor {what} is on the meta device and holds "
                                           "no values; load the weights first")
            if a.ndim != 2 or b.ndim != 2:
                raise AggregationError(
                    f"{who}, module {name!r}: A and B must be 2-D, got A{tuple(a.shape)} and B{tuple(b.shape)}"
                )
            r, fan_in = a.shape
            fan_out, rb = b.shape
            if r != rb:
                raise AggregationError(
                    f"{who}, module {name!r}: A is {tuple(a.shape)} (r x in) but B is {tuple(b.shape)} (out x r); "
                    f"their ranks differ ({r} vs {rb}). Pass (A, B) in that order with A: r x in, B: out x r."
                )
            if r < 1 or r > min(fan_out, fan_in):
                raise AggregationError(
                    f"{who}, module {name!r}: rank {r} is outside 1..min(out, in) = {min(fan_out, fan_in)} "
                    f"for a {fan_out} x {fan_in} module"
                )
            shape = (int(fan_out), int(fan_in))
            if name in shapes and shapes[name] != shape:
                raise AggregationError(
                    f"{who}, module {name!r}: shape {shape} (out, in) differs from {shapes[name]} in earlier "
                    "clients. All clients must adapt the same base model."
                )
            shapes[name] = shape
            if check_finite and not (_all_finite(a) and _all_finite(b)):
                bad = "A" if not _all_finite(a) else "B"
                raise AggregationError(
                    f"{who}, module {name!r}: factor {bad} holds NaN or Inf values; drop this client's update "
                    "(its local training diverged) or lower its learning rate"
                )
            if check_finite:
                bound = u.scale(name) * _norm64(a) * _norm64(b)
                if not bound <= MAX_UPDATE_NORM:
                    raise AggregationError(
                        f"{who}, module {name!r}: the update is too large to aggregate in float32 "
                        f"((alpha/r) ||B|| ||A|| = {bound:.3g} > {MAX_UPDATE_NORM:.0e}); drop this client's update "
                        "(its factors are corrupted or its training diverged)"
                    )
        register.check(u, who, i)
        register.record(u, i)
    return shapes


class RoundRegister:
    """What a round has taken in so far, for the checks across its clients: the same client (by
    ``client_id``, or the same update object) twice would count its weight twice, and float64
    factors beside lower precisions would make the result's precision follow whichever came
    first. :func:`validate_round` keeps one per call; a streaming round keeps one across its
    ``add`` calls, where replies already folded may be freed, so it holds them by weak reference
    (a freed reply's address can be reused by the next one).
    """

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._objects: dict[int, tuple[weakref.ref, int]] = {}
        self._precision: tuple[bool, int, str] | None = None  # (float64?, client, module) of the first

    def check(self, u: ClientUpdate, who: str, index: int) -> None:
        """Refuse ``u`` (the round's client ``index``, its factors already validated) when its client
        or the update itself is already in the round, or when a module's precision class differs
        from the round's first factors (those of ``u``'s first module when it is the first)."""
        held = self._objects.get(id(u))
        if held is not None and held[0]() is u:
            raise AggregationError(f"{who}: the same update is already in the round as client {held[1]}; each "
                                   "client may reply once per round")
        if u.client_id is not None and u.client_id in self._ids:
            raise AggregationError(f"{who}: the same client is already in the round as client "
                                   f"{self._ids[u.client_id]}; each client may reply once per round")
        first = self._precision or (_is_float64(*next(iter(u.factors.values()))), index, next(iter(u.factors)))
        for module, (a, b) in u.factors.items():
            wide = _is_float64(a, b)
            if wide != first[0]:
                raise AggregationError(
                    f"{who}, module {module!r}: its factors are {'float64' if wide else 'below float64'} but the "
                    f"round's first client's are {'float64' if first[0] else 'below float64'} (client {first[1]}, "
                    f"module {first[2]!r}); give every client of a round the same precision (e.g. .double() or "
                    ".float() on all factors)"
                )

    def record(self, u: ClientUpdate, index: int) -> None:
        """Note ``u`` as the round's client ``index``."""
        self._objects[id(u)] = (weakref.ref(u), index)
        if u.client_id is not None:
            self._ids[u.client_id] = index
        if self._precision is None:
            module, (a, b) = next(iter(u.factors.items()))
            self._precision = (_is_float64(a, b), index, module)


def _is_float64(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == torch.float64 or b.dtype == torch.float64


def _norm64(t: torch.Tensor) -> float:
    # Accumulated in float64, so the norm of large float32 values does not itself overflow.
    return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64))


def _all_finite(t: torch.Tensor) -> bool:
    # A sum is one fast reduction and propagates NaN/Inf; only when it is not finite (which an
    # overflow of large finite values can also cause) is the elementwise check needed.
    t = t.detach()
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def client_weights(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """Data-size weights ``p_k = n_k / sum_j n_j`` over the round's clients, as float64."""
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    return n / n.sum()


def check_rank_request(rank: int | Mapping[str, int], shapes: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """Resolve ``rank`` (one int, or one per module) to ``{module: r}`` and validate it."""
    if isinstance(rank, Mapping):
        missing = sorted(set(shapes) - set(rank))
        if missing:
            raise AggregationError(f"rank mapping lacks modules {missing[:5]}; give a rank for every module")
        unknown = sorted(set(rank) - set(shapes))
        if unknown:
            raise AggregationError(f"rank mapping names modules the round does not hold: {unknown[:5]}")
        ranks = {m: rank[m] for m in shapes}
    else:
        ranks = {m: rank for m in shapes}
    for m, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
            raise AggregationError(f"module {m!r}: requested rank must be a positive int, got {r!r}")
        ranks[m] = r = int(r)
        out_f, in_f = shapes[m]
        if r > min(out_f, in_f):
            raise AggregationError(
                f"module {m!r}: requested rank {r} exceeds min(out, in) = {min(out_f, in_f)} of its "
                f"{out_f} x {in_f} weight; cap the rank at min(out, in) (ClientType.module_ranks does this for "
                "a client type)"
            )
    return ranks
