"""The protocol of a federated method, and the plain values it exchanges with the engines.

A *method* (FedIT, FlexLoRA, HetLoRA, FLoRA, SLoRA, or one of a user's) is one object that the
shared orchestration (:mod:`flexlora.engines.federation`) calls at fixed points of a run:

========================  ====================================================================
``plan``                  what each sampled client's task carries: named tensors and plain
                          metadata (the global adapter at the client's ranks, a base to merge,
                          a sparse change, seeds, regulariser settings)
``client_train``          the client's round, run by every engine on the client side (a class
                          method: a Flower node has no server state); returns a ClientReply
``read_reply``            the reply checked against its task and turned into what the fold takes
``begin_fold``            one round's fold: ``add(task, update)`` as replies arrive, then
                          ``finish(check)`` installs the new global state (stages, merges,
                          pruning decisions happen here)
``global_factors`` ...    the global model for evaluation and export
``checkpoint``/``restore``  the method's state that must survive a crash
========================  ====================================================================

The orchestration and the engines never branch on a method's name. A task and a reply are
plain: :class:`~flexlora.training.client.ClientTask` carries ``tensors`` (name -> Tensor) and
``meta`` (JSON values), :class:`ClientReply` the same, so every engine moves any method's
messages without knowing what they mean (the Flower wire serialises them generically).
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from flexlora.core.aggregators import GlobalState
from flexlora.core.types import Factors
from flexlora.data.examples import Example
from flexlora.training.client import ClientSpec, ClientTask, EncodingOptions
from flexlora.training.local import LocalTrainConfig

# Every config of the older layout held these training keys (HetLoRA's regulariser), whatever its
# method; they are part of the fingerprints recorded then.
OLD_TRAIN_KEYS = {"hetlora_strength": 1e-3, "hetlora_gamma": 0.99}


class ReplyError(ValueError):
    """A client's reply that cannot be folded as the answer to its task (the message says why)."""


class StateError(ValueError):
    """A checkpoint's method state that does not fit the run (the message names the checkpoint)."""


@dataclass
class ClientReply:
    """What a client sends back for one task, in plain values.

    Attributes
    ----------
    tensors : mapping name -> Tensor
        The method's payload (LoRA factors as ``"<module>::A"``/``"<module>::B"``, SLoRA's
        stage-1 values as ``"<module>::values"``, ...).
    num_examples : int
        The client's data size (its aggregation weight).
    meta : dict
        Plain JSON values the method adds (alpha, scaling rule, client id, ...).
    train_loss : float
    steps : int
    """

    tensors: dict[str, torch.Tensor]
    num_examples: int
    meta: dict[str, Any] = field(default_factory=dict)
    train_loss: float = float("nan")
    steps: int = 0


@dataclass
class ClientContext:
    """What a client has beside its task: the shared base model, its examples and settings."""

    model: torch.nn.Module
    tokenizer: Any
    examples: Sequence[Example]
    train_cfg: LocalTrainConfig
    encoding: EncodingOptions
    dropout: float = 0.0
    on_step: Callable[[int, float], None] | None = None


@dataclass
class RunInfo:
    """What a method knows of its run (kept current by the orchestration).

    Attributes
    ----------
    shapes : dict module -> (out, in)
    groups : dict module -> group ("attention" / "mlp")
    alpha, rslora : the run's LoRA scaling
    seed : int
    init : {"shared", "per-client"}
        ``lora.init``.
    dtype : str
        The base model's dtype.
    num_clients : int
    used_ranks : callable
        The per-module ranks of every client type some client holds (types may be replaced by
        Flower nodes' declarations before the run starts).
    ranks_of : callable k -> ranks
        Client ``k``'s type ranks.
    log : callable
    privacy : PrivacyOptions or None
        The run's ``[privacy]`` section (bounds on each client's contribution, DP noise).
    round_size : int
        The clients sampled per round.
    rounds : int
        The planned rounds.
    """

    shapes: dict[str, tuple[int, int]]
    groups: dict[str, str]
    alpha: float
    rslora: bool
    seed: int
    init: str
    dtype: str
    num_clients: int
    used_ranks: Callable[[], list[dict[str, int]]]
    ranks_of: Callable[[int], dict[str, int]]
    log: Callable[[str], None] = print
    privacy: Any = None
    round_size: int = 1
    rounds: int = 1

    @property
    def max_rank(self) -> int:
        """The largest rank of any module of any client type in use."""
        return max(max(r.values()) for r in self.used_ranks())


@dataclass
class NoOptions:
    """This method has no settings of its own."""


class MethodFold(ABC):
    """One round of a method's aggregation, folded reply by reply."""

    @abstractmethod
    def add(self, task: ClientTask, update: Any) -> None:
        """Fold one checked reply in; raise :class:`~flexlora.core.types.AggregationError` to drop it."""

    @abstractmethod
    def finish(self, check: Callable[[list[str]], None]) -> dict[str, Any]:
        """Compute the new global state, call ``check(nonfinite_modules)`` (which raises to keep
        the previous state), install it, and return the method's entries of the round's record."""


class Method(ABC):
    """The protocol every federated method implements (see the module docstring).

    Parameters
    ----------
    options : dataclass instance
        The method's own settings section (an instance of :attr:`Options`).
    run : RunInfo
    """

    #: The registry name (the config's ``aggregator`` and its options section).
    name: ClassVar[str] = ""
    #: The dataclass of its settings section; its fields carry their help text.
    Options: ClassVar[type] = NoOptions
    #: Whether a client of a round must start from the same ``A`` (the method averages factors).
    averages_factors: ClassVar[bool] = False

    def __init__(self, options: Any, run: RunInfo) -> None:
        self.options = options
        self.run = run
        self.state: GlobalState | None = None

    # ------------------------------------------------------------- config
    @classmethod
    def create(cls, options: Mapping[str, Any], run: RunInfo) -> Method:
        """Build the method from its options sections (``{section name: options}``)."""
        return cls(options[cls.name], run)

    @classmethod
    def unbounded_contributions(cls, options: Any) -> str | None:
        """Why this method cannot bound its clients' contributions (``[privacy]``), or None when it can."""
        return "its clients' replies are not LoRA factors that the core aggregators bound"

    @classmethod
    def dp_refusal(cls, options: Any) -> str | None:
        """Why this method cannot run with differential-privacy noise, or None when it can."""
        return cls.unbounded_contributions(options)

    @classmethod
    def homogeneous(cls, options: Any) -> bool:
        """Whether every client must train at the same ranks (checked before the model loads)."""
        return False

    @classmethod
    def sections(cls, options: Any) -> tuple[str, ...]:
        """The option sections this method reads (its own; SLoRA also its stage 2's)."""
        return (cls.name,)

    @classmethod
    def legacy_config(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """How these settings were written before methods had sections (``aggregator_options``,
        ``train.hetlora_*``, ``[slora]``): the fingerprint of a run is taken over that older
        layout, so that the checkpoints and benchmark rows recorded before stay valid."""
        return {"aggregator_options": {}, "train": dict(OLD_TRAIN_KEYS)}

    def check_types(self) -> None:
        """Raise :class:`~flexlora.settings.ConfigError` when the run's client types cannot be
        served (called at start and whenever a Flower node's declared type changes them)."""
        return None

    def notes(self) -> list[str]:
        """Warnings for the start-up log."""
        return []

    def summary(self) -> str:
        """One line of the method's settings for the logs."""
        return self.name

    # ------------------------------------------------------------- clients
    def client_ranks(self, k: int, ranks: dict[str, int]) -> dict[str, int]:
        """The ranks client ``k`` trains at (``ranks``: its type's)."""
        return ranks

    @abstractmethod
    def plan(self, rnd: int, specs: Sequence[tuple[int, ClientSpec]]) -> list[tuple[dict[str, torch.Tensor],
                                                                                      dict[str, Any]]]:
        """The ``(tensors, meta)`` each sampled ``(client, spec)`` of round ``rnd`` is sent."""

    @classmethod
    @abstractmethod
    def client_train(cls, ctx: ClientContext, task: ClientTask) -> ClientReply:
        """The client's round (every engine calls this on the client side; the base model is
        left bit-identical)."""

    @abstractmethod
    def read_reply(self, task: ClientTask, reply: ClientReply) -> Any:
        """The update that ``reply`` carries, checked against ``task`` (modules, shapes, ranks,
        finite values, the scaling rule); raises :class:`ReplyError` naming the problem. The
        example count is checked by the orchestration."""

    @abstractmethod
    def begin_fold(self, rnd: int, tasks: Sequence[ClientTask]) -> MethodFold:
        """Start round ``rnd``'s fold."""

    # ---------------------------------------------------------- global model
    @abstractmethod
    def global_factors(self, ranks: Mapping[str, int]) -> dict[str, Factors]:
        """The global adapter as LoRA factors at ``ranks`` (for evaluation and export)."""

    def exact_factors(self) -> dict[str, Factors] | None:
        """The global update as exact factors when the method holds them (FLoRA's stack), for an
        export at ``export.rank = 0``; None to export at the largest client rank."""
        return None

    def type_factors(self, ranks: Mapping[str, int], alpha: float) -> dict[str, Factors] | None:
        """The global adapter as a client type receives it, for the per-type scores; None when
        the method sends no such adapter."""
        assert self.state is not None
        return self.global_factors(ranks)

    def base_context(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """The global model to evaluate while :attr:`state` is None (before the first round,
        or inside SLoRA's sparse stage)."""
        return contextlib.nullcontext()

    def final_state(self, rnd: int) -> None:
        """Called before the export of a run that ended at round ``rnd``: make :attr:`state` the
        adapter to export when the method has not built one yet."""
        return None

    # ---------------------------------------------------------- checkpoints
    def checkpoint(self) -> dict[str, Any]:
        """The method's state beside the global adapter (top-level checkpoint keys)."""
        return {}

    def restore(self, ckpt: Mapping[str, Any], where: str) -> None:
        """Take the method's state from a checkpoint (``self.state`` is already restored); raise
        :class:`StateError` naming ``where`` when it does not fit the run (any other exception
        is reported as a malformed checkpoint)."""
        return None


def options_of(cls: type[Method], values: Mapping[str, Any] | None, prefix: str) -> Any:
    """Build ``cls.Options`` from plain ``values`` (unknown keys are refused by name)."""
    from flexlora.settings import ConfigError, check_types

    values = dict(values or {})
    known = [f.name for f in dataclasses.fields(cls.Options)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else (
            f"; its settings are {', '.join(known)}" if known else f"; method {cls.name!r} has no settings")
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'{hint}")
    opts = cls.Options(**values)
    if not hasattr(opts, "key_prefix"):  # a plain dataclass: check its types here
        check_types(opts, prefix)
    return opts


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Payload bytes of named tensors (their element sizes)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def pack_factors(factors: Mapping[str, Factors], prefix: str = "") -> dict[str, torch.Tensor]:
    """``{module: (A, B)}`` as named tensors ``"<prefix><module>::A"`` and ``"...::B"``."""
    out: dict[str, torch.Tensor] = {}
    for m, (a, b) in factors.items():
        out[f"{prefix}{m}::A"] = a
        out[f"{prefix}{m}::B"] = b
    return out


def unpack_factors(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, Factors]:
    """Inverse of :func:`pack_factors` over the names that start with ``prefix``.

    Raises
    ------
    ReplyError
        For a name that is not ``<module>::A``/``::B``, a module with one factor, or a factor
        that is not 2-D floating point.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith(prefix):
            continue
        module, sep, which = key[len(prefix):].rpartition("::")
        if not sep or which not in ("A", "B") or not module:
            raise ReplyError(f"tensor {key!r} is not '{prefix}<module>::A' or '{prefix}<module>::B'")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise ReplyError(f"tensor {key!r} must be a 2-D floating-point factor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}")
        parts.setdefault(module, {})[which] = t
    out = {}
    for m, p in parts.items():
        if set(p) != {"A", "B"}:
            raise ReplyError(f"module {m!r} has only factor {''.join(p)}; both A and B are needed")
        out[m] = (p["A"], p["B"])
    return out


def rank_summary(ranks: Mapping[str, int], groups: Mapping[str, str]) -> dict[str, Any]:
    """A client's ranks per module group: one int when the group's modules agree, else [min, max]."""
    by: dict[str, list[int]] = {}
    for m, r in ranks.items():
        by.setdefault(groups.get(m, "other"), []).append(r)
    return {g: v[0] if min(v) == max(v) else [min(v), max(v)] for g, v in sorted(by.items())}
