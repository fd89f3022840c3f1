"""One client's round, independent of the engine that drives it.

Both the in-process simulation and the Flower client call :func:`train_client`: it attaches a
LoRA adapter at the client's own per-module ranks to the shared base model, loads the factors the
server distributed (or keeps PEFT's fresh initialisation), trains locally, and returns the
client's :class:`flexlora.ClientUpdate`. The base model is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from flexlora.core.aggregators.hetlora import rank_pruning_penalty
from flexlora.core.types import ClientUpdate, Factors
from flexlora.data.examples import Example
from flexlora.data.templates import encode_example
from flexlora.training.adapter import client_adapter, get_factors, live_factors
from flexlora.training.local import LocalTrainConfig, LocalTrainResult, train_local


@dataclass
class ClientSpec:
    """What the server knows of a client: its id, its per-module ranks and alpha, its type name."""

    client_id: str
    ranks: dict[str, int]
    alpha: float
    type_name: str


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
) -> tuple[ClientUpdate, LocalTrainResult]:
    """Train one client at its own ranks and return its update.

    Parameters
    ----------
    base_model : the shared, frozen base model (left unchanged on return).
    tokenizer : its tokenizer.
    spec : ClientSpec
        The client's id, per-module ranks and alpha.
    examples : sequence of Example
        The client's local training data; ``len(examples)`` is its ``num_examples``.
    init_factors : mapping module -> (A, B) or None
        The global adapter distributed to this client's ranks; None keeps PEFT's initialisation
        (random ``A``, zero ``B``), seeded by ``seed``.
    train_cfg : LocalTrainConfig
    seed : int
        Seeds the adapter initialisation, the batch order and dropout.
    encoding : EncodingOptions, optional
    hetlora : (strength, gamma) or None
        Adds HetLoRA's rank self-pruning regulariser to the loss.
    dropout : float
        LoRA dropout.
    on_step : callable(step, loss), optional
        Progress callback.
    """
    if not examples:
        raise ValueError(f"client {spec.client_id!r} has no training examples")
    features = encode_examples(tokenizer, examples, encoding or EncodingOptions())
    regularizer = None
    if hetlora is not None:
        strength, gamma = hetlora

        def regularizer(model: torch.nn.Module) -> torch.Tensor:
            return rank_pruning_penalty(live_factors(model), gamma=gamma, strength=strength)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with client_adapter(base_model, spec.ranks, spec.alpha, init_factors, dropout=dropout) as model:
            result = train_local(model, features, train_cfg, seed=seed, regularizer=regularizer, on_step=on_step)
            factors = get_factors(model)
    update = ClientUpdate(
        factors=factors,
        num_examples=len(examples),
        alpha=spec.alpha,
        client_id=spec.client_id,
        metadata={"type": spec.type_name, "train_loss": result.mean_loss, "steps": result.steps},
    )
    return update, result


def factor_bytes(factors: Mapping[str, Factors]) -> int:
    """Bytes of a set of factors as sent over the wire (their element sizes)."""
    return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in factors.values())
