"""One client's local training of its LoRA adapter.

:func:`train_local` runs the optimizer over the client's tokenised features with the base model
frozen. The loss is the token-mean cross entropy over the answer tokens (``labels != -100``),
normalised by the token count of the whole optimizer step, so that gradient accumulation over
micro-batches gives the same gradient as one large batch. Training is deterministic for a seed:
the batch order comes from a local :class:`torch.Generator`, and dropout runs under a forked,
seeded global RNG so that one client's training neither depends on nor disturbs another's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flexlora.training.adapter import live_factors
from flexlora.training.batching import IGNORE_INDEX, collate_for_training, count_steps, micro_batches

__all__ = ["LocalTrainConfig", "LocalTrainResult", "lr_multiplier", "token_loss_sum", "train_local"]

_OPTIMIZERS = ("adamw", "sgd")
_SCHEDULERS = ("constant", "linear", "cosine")


@dataclass
class LocalTrainConfig:
    """Hyper-parameters of one client's local training in one round."""

    optimizer: str = field(
        default="adamw", metadata={"help": "Local optimizer: 'adamw' (FedIT) or 'sgd' (FedAvg)."}
    )
    lr: float = field(default=3e-4, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (decoupled for AdamW, L2 for SGD)."})
    momentum: float = field(default=0.0, metadata={"help": "SGD momentum in [0, 1); must be 0 for AdamW."})
    micro_batch_size: int = field(default=4, metadata={"help": "Examples per forward/backward pass."})
    grad_accum_steps: int = field(default=1, metadata={"help": "Micro-batches accumulated per optimizer step."})
    local_steps: int = field(
        default=0, metadata={"help": "Optimizer steps per round; 0 means run for `epochs` passes over the data."}
    )
    epochs: float = field(
        default=1.0,
        metadata={"help": "Passes over the local data when local_steps is 0; fractions allowed (0.5 = half)."},
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip the global gradient norm of the LoRA factors to this; 0 disables."}
    )
    lr_scheduler: str = field(
        default="constant", metadata={"help": "Schedule within the round: 'constant', 'linear' or 'cosine'."}
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps at the start of the round."})

    def __post_init__(self) -> None:
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_scheduler not in _SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {_SCHEDULERS}, got {self.lr_scheduler!r}")
        for name in ("lr", "weight_decay", "momentum", "epochs", "max_grad_norm"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.momentum != 0 and self.optimizer != "sgd":
            raise ValueError(
                f"momentum={self.momentum!r} applies to optimizer='sgd' only; set it to 0 for {self.optimizer!r}"
            )
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}")
        for name in ("micro_batch_size", "grad_accum_steps", "local_steps", "warmup_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an int, got {v!r}")
        if self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.local_steps < 0:
            raise ValueError(f"local_steps must be >= 0 (0 = use epochs), got {self.local_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.local_steps == 0 and self.epochs <= 0:
            raise ValueError(f"local_steps is 0, so epochs must be > 0, got {self.epochs!r}")

    @property
    def examples_per_step(self) -> int:
        """Examples per optimizer step (``micro_batch_size * grad_accum_steps``)."""
        return self.micro_batch_size * self.grad_accum_steps

    def total_examples(self, num_examples: int) -> int:
        """Examples drawn in one round from a client holding ``num_examples``.

        ``local_steps * examples_per_step`` when ``local_steps`` is set, else
        ``ceil(epochs * num_examples)`` (at least one).
        """
        if self.local_steps > 0:
            return self.local_steps * self.examples_per_step
        return max(1, math.ceil(self.epochs * num_examples - 1e-9))

    def num_steps(self, num_examples: int) -> int:
        """Optimizer steps in one round (the last one may hold fewer examples in epoch mode)."""
        return count_steps(self.total_examples(num_examples), self.examples_per_step)


@dataclass
class LocalTrainResult:
    """Summary of one client's local training."""

    mean_loss: float = field(metadata={"help": "Mean over steps of the step's token-mean cross entropy "
                                               "(NaN if no step had a target token); excludes the regularizer."})
    steps: int = field(metadata={"help": "Optimizer steps taken."})
    tokens: int = field(metadata={"help": "Non-pad input tokens processed."})
    examples: int = field(metadata={"help": "Examples processed (with repeats across epochs)."})
    seconds: float = field(metadata={"help": "Wall-clock time of training."})
    losses: list[float] = field(default_factory=list, metadata={"help": "Per-step token-mean cross entropy."})
    mean_regularizer: float = field(default=0.0, metadata={"help": "Mean regularizer value over steps (0 if none)."})


def lr_multiplier(step: int, total_steps: int, scheduler: str, warmup_steps: int = 0) -> float:
    """Factor applied to the peak learning rate at optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps`` (never 0, so no step is
    wasted). Afterwards, with ``progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)``:
    ``constant`` 1, ``linear`` ``1 - progress``, ``cosine`` ``(1 + cos(pi * progress)) / 2``. The
    first post-warm-up step uses the full rate and the last one a positive rate.
    """
    if scheduler not in _SCHEDULERS:
        raise ValueError(f"lr_scheduler must be one of {_SCHEDULERS}, got {scheduler!r}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def token_loss_sum(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy over target positions, and their count.

    Position ``t`` predicts token ``t + 1``; targets are ``labels[:, 1:]`` other than ``-100``.
    The loss is computed in fp32 whatever the model's dtype.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1, :]
    target = batch["labels"][:, 1:]
    keep = target != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        return logits.sum() * 0.0, 0
    # Indexing first avoids an fp32 copy of the logits at positions that do not count.
    loss = F.cross_entropy(logits[keep].float(), target[keep], reduction="sum")
    return loss, count


def _target_count(batch: Mapping[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _rng_devices(params: Sequence[torch.Tensor]) -> list[int]:
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


def _pad_id(model: nn.Module, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    # Padded positions are masked out and carry label -100, so any valid id works as filler.
    return int(pad) if isinstance(pad, int) else 0


def train_local(
    model: nn.Module,
    features: Sequence[Mapping[str, Sequence[int]]],
    cfg: LocalTrainConfig,
    *,
    seed: int,
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    pad_token_id: int | None = None,
    params: Sequence[torch.Tensor] | None = None,
) -> LocalTrainResult:
    """Train the LoRA factors of ``model`` (or the given ``params``) on ``features``.

    Parameters
    ----------
    model : peft.PeftModel
        A model from :func:`flexlora.training.adapter.attach_adapter`. Only its LoRA factors are
        optimised; every other parameter is left untouched.
    features : sequence of mappings
        Tokenised examples with ``input_ids``, ``labels`` (``-100`` where no loss is taken) and
        optionally ``attention_mask``.
    cfg : LocalTrainConfig
    seed : int
        Seeds the batch order and any dropout. The caller's global RNG state is restored on return.
    regularizer : callable(model) -> scalar Tensor, optional
        Added to the loss once per optimizer step (e.g. HetLoRA's rank self-pruning penalty on
        :func:`~flexlora.training.adapter.live_factors`); it must be differentiable in the factors.
    on_step : callable(step, loss), optional
        Called after each optimizer step with the 1-based step number and the step's token-mean
        cross entropy (NaN if the step had no target token).
    pad_token_id : int, optional
        Filler id for padded positions; defaults to ``model.config.pad_token_id`` or 0.
    params : sequence of Tensor, optional
        The leaf tensors to optimise instead of the LoRA factors (SLoRA's stage-1 sparse
        changes, which ``model``'s forward must use).

    Returns
    -------
    LocalTrainResult

    Raises
    ------
    ValueError
        No features, or a model without LoRA factors.
    FloatingPointError
        The loss became NaN or Inf (diverged training); lower the learning rate.
    """
    if len(features) == 0:
        raise ValueError("train_local needs at least one training feature")
    if params is None:
        factors = live_factors(model)
        if not factors:
            raise ValueError("the model holds no LoRA factors; attach an adapter first (attach_adapter)")
        params = [p for pair in factors.values() for p in pair]
    params = list(params)
    for p in params:
        p.requires_grad_(True)
    if cfg.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    n = len(features)
    total = cfg.total_examples(n)
    steps = cfg.num_steps(n)
    pad = _pad_id(model, pad_token_id)
    device = params[0].device
    batches = micro_batches(n, total, cfg.micro_batch_size, seed=seed)

    losses: list[float] = []
    reg_sum = 0.0
    tokens = 0
    examples = 0
    was_training = model.training
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=_rng_devices(params)):
            torch.manual_seed(seed)
            model.train()
            for step in range(steps):
                group = []
                for _ in range(cfg.grad_accum_steps):
                    idx = next(batches, None)
                    if idx is None:
                        break
                    group.append(collate_for_training([features[i] for i in idx], pad))
                for g in optimizer.param_groups:
                    g["lr"] = cfg.lr * lr_multiplier(step, steps, cfg.lr_scheduler, cfg.warmup_steps)
                optimizer.zero_grad(set_to_none=True)
                # Normalising every micro-batch by the whole step's token count makes the summed
                # gradients equal to those of the token-mean loss over one big batch.
                step_tokens = sum(_target_count(b) for b in group)
                ce_sum = 0.0
                for b in group:
                    tokens += int(b["attention_mask"].sum())
                    examples += int(b["input_ids"].shape[0])
                    if _target_count(b) == 0:
                        continue  # contributes neither loss nor gradient
                    b = {k: v.to(device) for k, v in b.items()}
                    loss_sum, _ = token_loss_sum(model, b)
                    (loss_sum / step_tokens).backward()
                    ce_sum += float(loss_sum.detach())
                if regularizer is not None:
                    reg = regularizer(model)
                    reg.backward()
                    reg_sum += float(reg.detach())
                step_loss = ce_sum / step_tokens if step_tokens else float("nan")
                if step_tokens and not math.isfinite(step_loss):
                    raise FloatingPointError(
                        f"local training diverged at step {step + 1}: loss is {step_loss}; lower the learning rate"
                    )
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                losses.append(step_loss)
                if on_step is not None:
                    on_step(step + 1, step_loss)
    finally:
        model.train(was_training)
        # Gradients and optimizer state are as large as the factors; free them now rather than
        # whenever the caller drops the model.
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
    valid = [x for x in losses if not math.isnan(x)]
    return LocalTrainResult(
        mean_loss=sum(valid) / len(valid) if valid else float("nan"),
        steps=len(losses),
        tokens=tokens,
        examples=examples,
        seconds=time.perf_counter() - t0,
        losses=losses,
        mean_regularizer=reg_sum / len(losses) if losses else 0.0,
    )
