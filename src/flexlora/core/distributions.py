"""Client resource types and how clients are distributed over them.

The four LoRA configurations of Bai et al. (NeurIPS 2024, Table 1): ranks per module group
(attention = q, k, v, o projections; MLP = gate, up, down projections), alpha 16 for every type.
A run draws each client's type once, seeded, from one of the paper's distributions, or derives
it from the client's budget for the model at hand.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

ATTENTION = "attention"
MLP = "mlp"
_ATTENTION_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query", "key", "value", "c_attn")
_MLP_SUFFIXES = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "w1", "w2", "w3", "c_fc", "c_proj", "dense_h_to_4h", "dense_4h_to_h")


@dataclass(frozen=True)
class ClientType:
    """A client resource level: LoRA ranks per module group and alpha.

    Parameters
    ----------
    name : str
        Label used in logs and metrics (e.g. "type1").
    attention_rank : int
        Rank of the attention projections.
    mlp_rank : int
        Rank of the MLP projections.
    alpha : float, default 16.0
        LoRA alpha; the scaling is ``alpha / r`` per module (``alpha / sqrt(r)`` in a run with
        ``lora.rslora``, which applies to every type alike).
    """

    name: str
    attention_rank: int
    mlp_rank: int
    alpha: float = 16.0

    def __post_init__(self) -> None:
        for field_name in ("attention_rank", "mlp_rank"):
            v = getattr(self, field_name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"ClientType {self.name!r}: {field_name} must be a positive int, got {v!r}")
            object.__setattr__(self, field_name, int(v))  # a numpy int becomes a plain one
        if isinstance(self.alpha, bool) or not (isinstance(self.alpha, numbers.Real) and math.isfinite(self.alpha)
                                                and self.alpha > 0):
            raise ValueError(f"ClientType {self.name!r}: alpha must be a positive number, got {self.alpha!r}")

    def rank_for(self, group: str) -> int:
        """Rank of a module group ("attention" or "mlp")."""
        if group == ATTENTION:
            return self.attention_rank
        if group == MLP:
            return self.mlp_rank
        raise ValueError(f"unknown module group {group!r}; expected 'attention' or 'mlp'")

    def module_ranks(
        self, shapes: Mapping[str, tuple[int, int]], groups: Mapping[str, str] | None = None
    ) -> dict[str, int]:
        """Per-module ranks for modules of ``shapes`` (``out, in``), capped at ``min(out, in)``.

        ``groups`` maps module -> group; missing modules are classified by :func:`module_group`.
        """
        out = {}
        for m, (o, i) in shapes.items():
            g = groups[m] if groups is not None and m in groups else module_group(m)
            out[m] = min(self.rank_for(g), o, i)
        return out

    def trainable_params(
        self, shapes: Mapping[str, tuple[int, int]], groups: Mapping[str, str] | None = None
    ) -> int:
        """LoRA parameter count ``sum_m r_m (out_m + in_m)`` of this type on ``shapes``."""
        ranks = self.module_ranks(shapes, groups)
        return sum(ranks[m] * (o + i) for m, (o, i) in shapes.items())


PAPER_CLIENT_TYPES: tuple[ClientType, ...] = (
    ClientType("type1", 8, 8),
    ClientType("type2", 30, 30),
    ClientType("type3", 30, 200),
    ClientType("type4", 200, 200),
)
"""The four client types of the paper, smallest to largest."""


def module_group(name: str) -> str:
    """Classify a module name as "attention" or "mlp" by its last component.

    Raises
    ------
    ValueError
        When the name matches neither group; pass an explicit ``groups`` mapping then.
    """
    parts = name.split(".")
    last, parents = parts[-1], parts[:-1]
    # The parent path is more reliable than the leaf (GPT-2 has both attn.c_proj and mlp.c_proj).
    if any("attn" in p or "attention" in p for p in parents):
        return ATTENTION
    if any("mlp" in p or "ffn" in p or p == "feed_forward" for p in parents):
        return MLP
    if last in _ATTENTION_SUFFIXES:
        return ATTENTION
    if last in _MLP_SUFFIXES:
        return MLP
    raise ValueError(
        f"cannot tell whether module {name!r} is attention or MLP; pass groups={{module: 'attention'|'mlp'}}"
    )


def _normal_probs(k: int, sigma: float = 1.0) -> list[float]:
    # A bell centred on the middle of the resource order (index (k-1)/2), so the middle types get
    # most of the mass. (The reference code centres it one index too high.)
    centre = (k - 1) / 2.0
    dens = [math.exp(-0.5 * ((i - centre) / sigma) ** 2) for i in range(k)]
    s = sum(dens)
    return [d / s for d in dens]


def _heavy_tail(k: int, heavy_index: int, mass: float = 0.8) -> list[float]:
    if k == 1:
        return [1.0]
    rest = (1.0 - mass) / (k - 1)
    return [mass if i == heavy_index else rest for i in range(k)]


_DISTRIBUTIONS = {
    "homo": lambda k: [1.0] + [0.0] * (k - 1),
    "uniform": lambda k: [1.0 / k] * k,
    "heavy-tail-light": lambda k: _heavy_tail(k, 0),
    "heavy-tail-strong": lambda k: _heavy_tail(k, k - 1),
    "normal": _normal_probs,
}


def available_distributions() -> list[str]:
    """Names accepted by :func:`distribution_probabilities` and :func:`sample_client_types`."""
    return sorted(_DISTRIBUTIONS)


def distribution_probabilities(name: str, num_types: int = 4) -> list[float]:
    """Probability of each type (ordered smallest to largest) under distribution ``name``.

    - homo: every client at the smallest type (the "bucket effect" baseline);
    - uniform: ``1 / k`` each;
    - heavy-tail-light: 80 % on the smallest type, 20 % shared evenly by the others;
    - heavy-tail-strong: 80 % on the largest type, 20 % shared evenly by the others;
    - normal: a Gaussian bell (sigma = 1 type) over the resource order, centred on its middle;
      for the paper's four types: 0.1345, 0.3655, 0.3655, 0.1345.
    """
    if name not in _DISTRIBUTIONS:
        raise ValueError(f"unknown rank distribution {name!r}; choose one of {available_distributions()}")
    if num_types < 1:
        raise ValueError("num_types must be >= 1")
    return _DISTRIBUTIONS[name](num_types)


def sample_client_types(
    num_clients: int,
    distribution: str = "uniform",
    *,
    types: Sequence[ClientType] = PAPER_CLIENT_TYPES,
    seed: int = 0,
    exact: bool = False,
) -> list[ClientType]:
    """Assign a type to each of ``num_clients`` clients, reproducibly for ``seed``.

    Parameters
    ----------
    num_clients : int
    distribution : str, default "uniform"
        One of :func:`available_distributions`.
    types : sequence of ClientType, default PAPER_CLIENT_TYPES
        Ordered from the smallest to the largest resources; user-defined types are allowed.
    seed : int, default 0
    exact : bool, default False
        False draws each client independently (as the paper does). True allocates counts by
        largest remainders so the realised shares match the probabilities as closely as integer
        counts allow, then shuffles them (useful with few clients).
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive int, got {num_clients!r}")
    if not types:
        raise ValueError("types must not be empty")
    probs = np.asarray(distribution_probabilities(distribution, len(types)), dtype=np.float64)
    rng = np.random.default_rng(seed)
    if exact:
        raw = probs * num_clients
        counts = np.floor(raw).astype(int)
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[: num_clients - counts.sum()]] += 1
        idx = np.repeat(np.arange(len(types)), counts)
        rng.shuffle(idx)
    else:
        idx = rng.choice(len(types), size=num_clients, p=probs / probs.sum())
    return [types[int(i)] for i in idx]


def type_counts(assignment: Sequence[ClientType]) -> dict[str, int]:
    """How many clients hold each type name."""
    return dict(Counter(t.name for t in assignment))


def types_from_ranks(ranks: Sequence[int | tuple[int, int]], *, alpha: float = 16.0) -> list[ClientType]:
    """Explicit per-client ranks: an int (both groups) or ``(attention_rank, mlp_rank)`` per client.

    Raises
    ------
    ValueError
        An entry that is not a positive int or a pair of them (a bool, a float, a triple, ...).
    """
    def whole(x: object) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    out = []
    for i, r in enumerate(ranks):
        if whole(r):
            att = mlp = int(r)  # type: ignore[call-overload]
        elif isinstance(r, tuple | list) and len(r) == 2 and all(whole(x) for x in r):
            att, mlp = int(r[0]), int(r[1])
        else:
            raise ValueError(f"ranks[{i}] must be a positive int or (attention_rank, mlp_rank), got {r!r}")
        out.append(ClientType(f"r{att}-{mlp}", att, mlp, alpha))
    return out


def types_from_budget(
    budgets: Sequence[float],
    shapes: Mapping[str, tuple[int, int]],
    *,
    types: Sequence[ClientType] = PAPER_CLIENT_TYPES,
    unit: str = "params",
    bytes_per_param: float = 16.0,
    groups: Mapping[str, str] | None = None,
) -> list[ClientType]:
    """The largest type whose LoRA fits each client's budget, for modules of ``shapes``.

    Parameters
    ----------
    budgets : sequence of float
        One budget per client: trainable parameters (``unit="params"``) or bytes (``unit="bytes"``).
    shapes : mapping module -> (out, in)
        The adapted modules of the model at hand.
    types : sequence of ClientType
        Candidates; the largest one (by trainable parameters on ``shapes``) that fits is chosen.
    unit : {"params", "bytes"}
    bytes_per_param : float, default 16.0
        Memory per trainable parameter when ``unit="bytes"``: fp32 weight, gradient and the two
        AdamW moments (4 x 4 bytes). Activations and the frozen base are not counted.
    groups : mapping module -> group, optional

    Raises
    ------
    ValueError
        When a budget does not fit even the smallest type (the message gives the smallest cost).
    """
    if unit not in ("params", "bytes"):
        raise ValueError(f"unit must be 'params' or 'bytes', got {unit!r}")
    if not types:
        raise ValueError("types is empty: give at least one candidate ClientType")
    if not shapes:
        raise ValueError("shapes must name at least one module")
    if isinstance(budgets, str | bytes | numbers.Number) or not hasattr(budgets, "__iter__"):
        raise ValueError(f"budgets must be a sequence with one budget per client, got {budgets!r}")
    bad = {m: s for m, s in shapes.items()
           if len(s) != 2 or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in s)}
    if bad:
        raise ValueError(f"shapes must map each module to (out, in) positive ints; got {dict(list(bad.items())[:3])}")
    if isinstance(bytes_per_param, bool) or not isinstance(bytes_per_param, numbers.Real) \
            or not 0 < bytes_per_param < math.inf:
        raise ValueError(f"bytes_per_param must be a positive number, got {bytes_per_param!r}")
    costs = []
    for t in types:
        p = t.trainable_params(shapes, groups)
        costs.append((p * (bytes_per_param if unit == "bytes" else 1.0), t))
    costs.sort(key=lambda c: c[0])
    out = []
    for i, b in enumerate(budgets):
        try:
            value = math.nan if isinstance(b, bool) else float(b)
        except (TypeError, ValueError):
            value = math.nan
        if not 0 < value < math.inf:
            raise ValueError(f"client {i}: budget must be a positive finite number of {unit}, got {b!r}")
        b = value
        fitting = [t for c, t in costs if c <= b]
        if not fitting:
            raise ValueError(
                f"client {i}: budget {b:g} {unit} is below the smallest type {costs[0][1].name!r}, "
                f"which needs {costs[0][0]:g} {unit} on this model"
            )
        out.append(fitting[-1])
    return out
