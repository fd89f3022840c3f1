"""One client's round, independent of the engine that drives it.

Both the in-process simulation and the Flower client call :func:`train_client`: it attaches a
LoRA adapter at the client's own per-module ranks to the shared base model, loads the factors the
server distributed (or keeps PEFT's fresh initialisation), trains locally, and returns the
client's :class:`flexlora.ClientUpdate`. The base model is left exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flexlora.core.aggregators.hetlora import rank_pruning_penalty
from flexlora.core.initial import fresh_factors
from flexlora.core.types import ClientUpdate, Factors, lora_scaling
from flexlora.data.examples import Example
from flexlora.data.templates import encode_example
from flexlora.training.adapter import (
    check_ranks,
    client_adapter,
    get_factors,
    live_factors,
    merged_weight,
)
from flexlora.training.local import LocalTrainConfig, LocalTrainResult, train_local


@dataclass
class ClientSpec:
    """What the server knows of a client: its id, its per-module ranks and alpha, its type name,
    and whether it scales by ``alpha / sqrt(r)`` (``rslora``; last and defaulted so that
    positional construction of the other fields is unchanged)."""

    client_id: str
    ranks: dict[str, int]
    alpha: float
    type_name: str
    rslora: bool = False


@dataclass
class EncodingOptions:
    """How a client turns its examples into training features."""

    template: str = "alpaca"
    cutoff_len: int = 256
    train_on_inputs: bool = False


def encode_examples(tokenizer, examples: Sequence[Example], enc: EncodingOptions) -> list[dict[str, list[int]]]:
    """Tokenised training features of ``examples`` (prompt labels masked unless ``train_on_inputs``)."""
    return [
        encode_example(
            tokenizer, ex, template=enc.template, cutoff_len=enc.cutoff_len, train_on_inputs=enc.train_on_inputs
        )
        for ex in examples
    ]


def train_client(
    base_model: torch.nn.Module,
    tokenizer,
    spec: ClientSpec,
    examples: Sequence[Example],
    init_factors: Mapping[str, Factors] | None,
    train_cfg: LocalTrainConfig,
    *,
    seed: int,
    encoding: EncodingOptions | None = None,
    hetlora: tuple[float, float] | None = None,
    dropout: float = 0.0,
    on_step: Callable[[int, float], None] | None = None,
    init_seed: int | None = None,
) -> tuple[ClientUpdate, LocalTrainResult]:
    """Train one client at its own ranks and return its update.

    Parameters
    ----------
    base_model : the shared, frozen base model (left unchanged on return).
    tokenizer : its tokenizer.
    spec : ClientSpec
        The client's id, per-module ranks, alpha and scaling rule (``spec.rslora``).
    examples : sequence of Example
        The client's local training data; ``len(examples)`` is its ``num_examples``.
    init_factors : mapping module -> (A, B) or None
        The global adapter distributed to this client's ranks. None starts from a fresh adapter:
        the round's shared one of ``init_seed`` (:func:`flexlora.core.initial.fresh_factors`), or,
        without ``init_seed``, PEFT's own initialisation seeded by ``seed`` (a standalone client).
    train_cfg : LocalTrainConfig
    seed : int
        Seeds the batch order and dropout (and PEFT's initialisation when neither
        ``init_factors`` nor ``init_seed`` is given).
    encoding : EncodingOptions, optional
    hetlora : (strength, gamma) or None
        Adds HetLoRA's rank self-pruning regulariser to the loss.
    dropout : float
        LoRA dropout.
    on_step : callable(step, loss), optional
        Progress callback.
    init_seed : int, optional
        The seed of the fresh adapter that every client of the round shares (ignored when
        ``init_factors`` is given).
    """
    if not examples:
        raise ValueError(f"client {spec.client_id!r} has no training examples")
    features = encode_examples(tokenizer, examples, encoding or EncodingOptions())
    regularizer = None
    if hetlora is not None:
        strength, gamma = hetlora

        def regularizer(model: torch.nn.Module) -> torch.Tensor:
            return rank_pruning_penalty(live_factors(model), gamma=gamma, strength=strength)

    if init_factors is None and init_seed is not None:
        # The adapter's own rank check gives the shapes (and names a module the base lacks).
        init_factors = fresh_factors(check_ranks(base_model, spec.ranks), spec.ranks, init_seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with client_adapter(base_model, spec.ranks, spec.alpha, init_factors, dropout=dropout,
                            rslora=spec.rslora) as model:
            result = train_local(model, features, train_cfg, seed=seed, regularizer=regularizer, on_step=on_step)
            factors = get_factors(model)
    update = ClientUpdate(
        factors=factors,
        num_examples=len(examples),
        alpha=spec.alpha,
        client_id=spec.client_id,
        metadata={"type": spec.type_name, "train_loss": result.mean_loss, "steps": result.steps},
        rslora=spec.rslora,
    )
    return update, result


@dataclass
class ClientTask:
    """Everything a client needs from the server for one round (what one engine message carries).

    The payload is plain, so that every engine moves every method's tasks without knowing them:
    the method that planned the task (:mod:`flexlora.methods`) gives ``tensors`` and ``meta``
    their meaning, and its ``client_train`` reads them on the client.

    Parameters
    ----------
    round : int
    client : int
        The client's index in the run (its data partition).
    spec : ClientSpec
        Its id, per-module ranks, alpha and type name.
    seed : int
        Seeds the client's batch order and dropout.
    tensors : dict name -> Tensor
        The method's tensors for this client (for LoRA methods the global adapter distributed
        to the client's ranks as ``"init/<module>::A"``/``::B``; FLoRA's base as ``"base/..."``).
    meta : dict
        The method's plain JSON values (seeds, regulariser settings, mask sizes, ...).
    """

    round: int
    client: int
    spec: ClientSpec
    seed: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def merged_into_base(
    base_model: torch.nn.Module, delta: Mapping[str, Factors] | None, alpha: float, *, rslora: bool = False
) -> Iterator[None]:
    """Add ``s B @ A`` of every module in ``delta`` to the base weights for the duration of the
    block, then copy the original weights back bit for bit (FLoRA's clients train on
    ``W0 + global``).

    Parameters
    ----------
    base_model : torch.nn.Module
    delta : mapping module -> (A, B) or None
        None or empty leaves the base untouched.
    alpha : float
    rslora : bool, default False
        ``s = alpha / sqrt(r)`` instead of ``alpha / r``: the scaling ``delta`` was made for.
    """
    if not delta:
        yield
        return
    modules = dict(base_model.named_modules())
    saved = {}
    try:
        with torch.no_grad():
            for m, (a, b) in delta.items():
                w = modules[m].weight
                saved[m] = w.detach().clone()
                scale = lora_scaling(alpha, a.shape[0], rslora)
                w.copy_(merged_weight(w, scale * (b.to(w.device, torch.float32) @ a.to(w.device, torch.float32))))
        yield
    finally:
        with torch.no_grad():
            for m, w0 in saved.items():
                modules[m].weight.copy_(w0)


def factor_bytes(factors: Mapping[str, Factors]) -> int:
    """Bytes of a set of factors as sent over the wire (their element sizes)."""
    return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in factors.values())
