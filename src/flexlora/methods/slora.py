"""SLoRA (Babakniya et al., "SLoRA: Federated Parameter Efficient Fine-Tuning of Language
Models", arXiv 2308.06522): a sparse stage 1 of full-parameter changes on a fixed random mask per
module, averaged with data-size weights; then LoRA (FedIT or FlexLoRA) from the SVD of the
stage-1 change.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flexlora.core.sparse import SparseUpdate, aggregate_sparse, lora_share, mask_counts, stage2_state
from flexlora.core.types import Factors
from flexlora.methods.base import (
    ClientContext,
    ClientReply,
    Method,
    MethodFold,
    ReplyError,
    RunInfo,
    StateError,
)
from flexlora.methods.flora import merge_precision_note
from flexlora.methods.lora import LoRAMethod
from flexlora.settings import CheckedSection, ConfigError, setting
from flexlora.training.adapter import linear_shapes
from flexlora.training.client import ClientSpec, ClientTask, encode_examples
from flexlora.training.sparse import SparseTask, merged_sparse_change, train_sparse_client

VALUES = "::values"


@dataclass
class SLoRAOptions(CheckedSection):
    """SLoRA's two stages (``[slora]``); stage 2's own settings are in its section (``[flexlora]``)."""

    key_prefix = "slora."

    stage1_rounds: int = setting(2, "Rounds of stage 1: sparse full-parameter changes on a fixed random mask per "
                                 "module, averaged with data-size weights.")
    density: float = setting(0.0, "Mask density of stage 1 in (0, 1]; 0 = each client type's LoRA parameter share of "
                             "the module, r (out + in) / (out in).")
    then: str = setting("fedit", "Aggregation of stage 2: fedit (homogeneous ranks) or flexlora.",
                        choices=("fedit", "flexlora"))

    def check(self) -> None:
        if not isinstance(self.stage1_rounds, bool) and isinstance(self.stage1_rounds, int) and self.stage1_rounds < 1:
            raise ConfigError("config key 'slora.stage1_rounds': must be >= 1 (for no sparse stage use the aggregator "
                              "of slora.then)")
        if isinstance(self.density, int | float) and not 0.0 <= self.density <= 1.0:
            raise ConfigError(f"config key 'slora.density': must be in (0, 1], or 0 for each client type's LoRA share; "
                              f"got {self.density!r}")


class SLoRA(Method):
    """Sparse stage 1, then the LoRA method of ``then`` from the SVD of the stage-1 change."""

    name = "slora"
    Options = SLoRAOptions

    def __init__(self, options: SLoRAOptions, run: RunInfo, stage2: LoRAMethod) -> None:
        super().__init__(options, run)
        self.stage2 = stage2
        # The stage-1 global change (values on each module's largest mask prefix).
        self.change: dict[str, torch.Tensor] | None = None

    @classmethod
    def create(cls, options: Mapping[str, Any], run: RunInfo) -> SLoRA:
        from flexlora.methods import method_class

        own = options[cls.name]
        stage2 = method_class(own.then)
        return cls(own, run, stage2.create(options, run))  # type: ignore[arg-type]

    @classmethod
    def unbounded_contributions(cls, options: Any) -> str | None:
        if options.stage1_rounds > 0:
            return "its stage-1 sparse changes are not bounded yet (set slora.stage1_rounds = 0 to bound stage 2 alone)"
        return None

    @classmethod
    def dp_refusal(cls, options: Any) -> str | None:
        return cls.unbounded_contributions(options)

    @classmethod
    def homogeneous(cls, options: Any) -> bool:
        return options.then == "fedit"

    @classmethod
    def legacy_config(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        from flexlora.methods import method_class

        own = options[cls.name]
        return {**method_class(own.then).legacy_config(options), "slora": dataclasses.asdict(own)}

    @classmethod
    def sections(cls, options: Any) -> tuple[str, ...]:
        return (cls.name, options.then)

    # The global LoRA state is stage 2's.
    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.stage2.state if hasattr(self, "stage2") else None

    @state.setter
    def state(self, value: Any) -> None:
        if hasattr(self, "stage2"):
            self.stage2.state = value

    def check_types(self) -> None:
        self.stage2.check_types()

    def notes(self) -> list[str]:
        return [*merge_precision_note(self.name, self.run.dtype), *self.stage2.notes()]

    def summary(self) -> str:
        return f"slora (stage 1: {self.options.stage1_rounds} sparse rounds, then {self.stage2.summary()})"

    def in_stage1(self, rnd: int) -> bool:
        return rnd <= self.options.stage1_rounds

    def counts(self, k: int | None = None) -> dict[str, int]:
        """Stage-1 mask size per module of client ``k`` (its type's density), or, for ``None``, the
        largest over the run's client types (the support of the global change)."""
        d, shapes = self.options.density, self.run.shapes

        def of(ranks: dict[str, int]) -> dict[str, int]:
            return mask_counts(shapes, d if d > 0 else {m: lora_share(ranks[m], s) for m, s in shapes.items()})

        if k is not None:
            return of(self.run.ranks_of(k))
        per_type = [of(r) for r in self.run.used_ranks()]
        return {m: max(c[m] for c in per_type) for m in shapes}

    def _stage2_state(self, rnd: int) -> Any:
        # Stage 2 starts from the SVD of the whole stage-1 change (not from scratch).
        assert self.change is not None
        then = self.options.then
        ranks = self.run.max_rank if then == "flexlora" else self.run.ranks_of(0)
        return stage2_state(self.change, self.run.shapes, self.run.seed, then=then, max_rank=ranks,
                            alpha=self.run.alpha, rslora=self.run.rslora, round=rnd)

    # --------------------------------------------------------------- clients
    def plan(self, rnd: int, specs: Sequence[tuple[int, ClientSpec]]) -> list[tuple[dict[str, torch.Tensor],
                                                                                      dict[str, Any]]]:
        if not self.in_stage1(rnd):
            return self.stage2.plan(rnd, specs)
        change = {f"{m}{VALUES}": v for m, v in (self.change or {}).items()}
        return [(dict(change), {"stage": 1, "counts": self.counts(k), "mask_seed": self.run.seed}) for k, _ in specs]

    @classmethod
    def client_train(cls, ctx: ClientContext, task: ClientTask) -> ClientReply:
        if task.meta.get("stage") != 1:
            return LoRAMethod.client_train(ctx, task)
        if not ctx.examples:
            raise ValueError(f"client {task.spec.client_id!r} has no training examples")
        counts = {str(m): int(c) for m, c in task.meta["counts"].items()}
        change = {k.removesuffix(VALUES): v for k, v in task.tensors.items() if k.endswith(VALUES)} or None
        sparse = SparseTask(counts, int(task.meta["mask_seed"]), change)
        shapes = linear_shapes(ctx.model, counts)
        features = encode_examples(ctx.tokenizer, ctx.examples, ctx.encoding)
        update, result = train_sparse_client(ctx.model, features, ctx.examples, sparse, shapes, ctx.train_cfg,
                                             seed=task.seed, client_id=task.spec.client_id)
        return ClientReply(tensors={f"{m}{VALUES}": v for m, v in update.values.items()},
                           num_examples=update.num_examples, meta={"client_id": update.client_id},
                           train_loss=result.mean_loss, steps=result.steps)

    def read_reply(self, task: ClientTask, reply: ClientReply) -> Any:
        if task.meta.get("stage") != 1:
            return self.stage2.read_reply(task, reply)
        odd = [k for k in reply.tensors if not k.endswith(VALUES)]
        if odd:
            raise ReplyError(f"a stage-1 SLoRA round needs sparse changes ('<module>{VALUES}'), got {odd[:3]}")
        values = {k.removesuffix(VALUES): v for k, v in reply.tensors.items()}
        if set(values) != set(self.run.shapes):
            raise ReplyError("the sparse change's modules differ from the run's")
        for m, k in task.meta["counts"].items():
            v = values[m]
            if not v.is_floating_point() or tuple(v.shape) != (k,):
                raise ReplyError(f"module {m!r}: sparse change of shape {tuple(v.shape)}, expected ({k},)")
            if not torch.isfinite(v).all():
                raise ReplyError(f"module {m!r}: the sparse change holds NaN or Inf")
        if reply.num_examples <= 0:
            raise ReplyError(f"num_examples is {reply.num_examples}")
        return SparseUpdate(values=values, num_examples=reply.num_examples, client_id=task.spec.client_id)

    def begin_fold(self, rnd: int, tasks: Sequence[ClientTask]) -> MethodFold:
        if self.in_stage1(rnd):
            return _SparseFold(self, rnd)
        return _Stage2Fold(self.stage2.begin_fold(rnd, tasks))

    # ---------------------------------------------------------- global model
    def global_factors(self, ranks: Mapping[str, int]) -> dict[str, Factors]:
        return self.stage2.global_factors(ranks)

    def type_factors(self, ranks: Mapping[str, int], alpha: float) -> dict[str, Factors] | None:
        return self.stage2.type_factors(ranks, alpha)

    def base_context(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        if self.change is None:
            return contextlib.nullcontext()
        # Inside stage 1 the global model is W0 plus the sparse change itself.
        return merged_sparse_change(model, self.change, self.run.shapes, self.run.seed)

    def final_state(self, rnd: int) -> None:
        if self.state is None and self.change is not None:
            # A run that ends inside stage 1 exports the LoRA its stage 2 would start from.
            self.state = self._stage2_state(rnd)

    def checkpoint(self) -> dict[str, Any]:
        return {**self.stage2.checkpoint(), "slora_change": dict(self.change) if self.change is not None else None}

    def restore(self, ckpt: Mapping[str, Any], where: str) -> None:
        self.stage2.restore(ckpt, where)
        change = ckpt.get("slora_change")
        self.change = {str(m): v for m, v in change.items()} if change is not None else None
        if self.change is not None:
            odd = sorted(set(self.change) - set(self.run.shapes))
            bad = [m for m, v in self.change.items() if not isinstance(v, torch.Tensor) or not bool(torch.isfinite(v).all())]
            if odd or bad:
                raise StateError(f"checkpoint {where}: its SLoRA stage-1 change is malformed (modules the model lacks: "
                                 f"{odd[:3]}; non-finite or not tensors: {bad[:3]}); delete it to restart the run")


class _SparseFold(MethodFold):
    """A stage-1 round: the sparse changes are kept until :meth:`finish` (their average is one
    weighted sum over the round)."""

    def __init__(self, method: SLoRA, rnd: int) -> None:
        self.method = method
        self.rnd = rnd
        self.updates: list[SparseUpdate] = []

    def add(self, task: ClientTask, update: SparseUpdate) -> None:
        self.updates.append(update)

    def finish(self, check: Callable[[list[str]], None]) -> dict[str, Any]:
        s = self.method
        change = aggregate_sparse(self.updates, s.counts(), previous=s.change)
        check([m for m, v in change.items() if not bool(torch.isfinite(v).all())])
        s.change = change
        self.updates = []
        if self.rnd == s.options.stage1_rounds:
            s.state = s._stage2_state(self.rnd)
        return {"slora_stage": 1}


class _Stage2Fold(MethodFold):
    def __init__(self, inner: MethodFold) -> None:
        self.inner = inner

    def add(self, task: ClientTask, update: Any) -> None:
        self.inner.add(task, update)

    def finish(self, check: Callable[[list[str]], None]) -> dict[str, Any]:
        return {**self.inner.finish(check), "slora_stage": 2}
