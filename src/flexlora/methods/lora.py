"""What every LoRA method shares: distribute the global adapter at each client's ranks, train
plain LoRA on the client, check the returned factors, fold them into a core aggregator.

FedIT, FlexLoRA, HetLoRA and FLoRA are this class with a different core aggregator and a few
overrides (HetLoRA's regulariser and pruning, FLoRA's merge into the base).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from flexlora.core.aggregators import Aggregator
from flexlora.core.initial import fresh_factors
from flexlora.core.lowrank import stable_seed
from flexlora.core.types import AggregationError, ClientUpdate, Factors, validate_round
from flexlora.methods.base import (
    ClientContext,
    ClientReply,
    Method,
    MethodFold,
    ReplyError,
    pack_factors,
    unpack_factors,
)
from flexlora.methods.privacy import ContributionBound
from flexlora.settings import ConfigError
from flexlora.training.client import ClientSpec, ClientTask, merged_into_base, train_client


class LoRAMethod(Method):
    """A method whose clients train LoRA factors and whose server folds them into a core
    :class:`~flexlora.core.aggregators.Aggregator` (:attr:`aggregator_class`).

    The aggregator is built on first use with :meth:`aggregator_kwargs`, and again only if those
    change: on Flower the nodes' declared types (and so FlexLoRA's largest rank) are known only
    after the run is set up, and the start-up log may have asked for the aggregator before.
    """

    #: The core aggregator's class; the options fields its constructor accepts are its settings.
    aggregator_class: ClassVar[type[Aggregator]]

    def __init__(self, options: Any, run: Any) -> None:
        super().__init__(options, run)
        self._aggregator: Aggregator | None = None
        self._aggregator_kwargs: dict[str, Any] | None = None
        # The run's bound on each client's contribution ([privacy]); the aggregator applies it.
        self.bound = ContributionBound(run.privacy, population=run.num_clients, sampled=run.round_size,
                                       rounds=run.rounds, seed=run.seed)

    @classmethod
    def unbounded_contributions(cls, options: Any) -> str | None:
        return None

    @classmethod
    def dp_refusal(cls, options: Any) -> str | None:
        return None

    def notes(self) -> list[str]:
        return self.bound.notes()

    # ------------------------------------------------------------ aggregator
    def aggregator_kwargs(self) -> dict[str, Any]:
        """The core aggregator's settings: the options fields it accepts."""
        params = inspect.signature(self.aggregator_class.__init__).parameters
        return {k: v for k, v in dataclasses.asdict(self.options).items() if k in params}

    @property
    def aggregator(self) -> Aggregator:
        kwargs = self.aggregator_kwargs()
        if self._aggregator is None or kwargs != self._aggregator_kwargs:
            try:
                self._aggregator = self.aggregator_class(**kwargs)
            except (AggregationError, TypeError) as exc:
                raise ConfigError(f"config key '{self.name}': {exc}") from exc
            self._aggregator_kwargs = kwargs
        return self._aggregator

    def summary(self) -> str:
        return self.aggregator.summary()

    @classmethod
    def legacy_config(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        from flexlora.settings import non_defaults

        # The older ``aggregator_options`` held exactly the settings given, which were the
        # aggregator's keyword arguments under the same names.
        return {**super().legacy_config(options),
                "aggregator_options": {k: cls.legacy_value(k, v) for k, v in non_defaults(options[cls.name]).items()}}

    @classmethod
    def legacy_value(cls, key: str, value: Any) -> Any:
        """A setting's value as the older ``aggregator_options`` wrote it."""
        return value

    # --------------------------------------------------------------- clients
    def plan(self, rnd: int, specs: Sequence[tuple[int, ClientSpec]]) -> list[tuple[dict[str, torch.Tensor],
                                                                                      dict[str, Any]]]:
        # Clients without a global adapter to start from (round 1) all start from the round's one
        # fresh adapter, so that averaging factors averages training, not independent random
        # initialisations (flexlora.core.initial). lora.init = "per-client" (product aggregators
        # only) leaves each client to PEFT's initialisation under its own seed.
        shared = self.shared_tensors(rnd)
        init_seed = stable_seed("init", self.run.seed, rnd) if self.run.init == "shared" else None
        out = []
        for _k, spec in specs:
            tensors = dict(shared)
            meta = self.client_meta(spec)
            init = self.initial_factors(spec)
            if init is not None:
                tensors.update(pack_factors(init, "init/"))
            else:
                meta["init_seed"] = init_seed
            out.append((tensors, meta))
        return out

    def shared_tensors(self, rnd: int) -> dict[str, torch.Tensor]:
        """Tensors every client of the round is sent (FLoRA's base)."""
        return {}

    def client_meta(self, spec: ClientSpec) -> dict[str, Any]:
        """Plain settings every client is sent (HetLoRA's regulariser)."""
        return {}

    def initial_factors(self, spec: ClientSpec) -> dict[str, Factors] | None:
        """The global adapter at the client's ranks, or None to start from a fresh one."""
        if self.state is None:
            return None
        return self.aggregator.distribute(self.state, spec.ranks, spec.alpha, rslora=spec.rslora)

    @classmethod
    def regularizer(cls, task: ClientTask) -> tuple[float, float] | None:
        """HetLoRA's ``(strength, gamma)`` when the task asks for its regulariser."""
        return None

    @classmethod
    def client_train(cls, ctx: ClientContext, task: ClientTask) -> ClientReply:
        init = unpack_factors(task.tensors, "init/") or None
        base = unpack_factors(task.tensors, "base/") or None
        init_seed = task.meta.get("init_seed")
        if init_seed is not None and (isinstance(init_seed, bool) or not isinstance(init_seed, int)
                                      or not 0 <= init_seed < 2**63):
            # The task came over a wire: a seed that is not one would otherwise fail deep in torch,
            # or (a float, a bool) be silently rounded into another initialisation.
            raise ValueError(f"the task's init_seed {init_seed!r} is not a seed (an integer in [0, 2**63)); "
                             "the server that sent it is not a compatible flexlora")
        with merged_into_base(ctx.model, base, task.spec.alpha, rslora=task.spec.rslora):
            update, result = train_client(
                ctx.model, ctx.tokenizer, task.spec, ctx.examples, init, ctx.train_cfg, seed=task.seed,
                encoding=ctx.encoding, hetlora=cls.regularizer(task), dropout=ctx.dropout, on_step=ctx.on_step,
                init_seed=init_seed,
            )
        return ClientReply(tensors=pack_factors(update.factors), num_examples=update.num_examples,
                           meta={"alpha": float(update.alpha), "rslora": bool(update.rslora),
                                 "client_id": update.client_id},
                           train_loss=result.mean_loss, steps=result.steps)

    def read_reply(self, task: ClientTask, reply: ClientReply) -> ClientUpdate:
        meta = reply.meta
        client_id = meta.get("client_id")
        if client_id not in (None, "") and client_id != task.spec.client_id:
            raise ReplyError(f"the reply is labelled {client_id!r}, but the task was {task.spec.client_id!r}'s")
        factors = unpack_factors(reply.tensors)
        shapes = self.run.shapes
        missing = sorted(set(shapes) - set(factors))
        extra = sorted(set(factors) - set(shapes))
        if missing or extra:
            raise ReplyError(f"modules differ from the run's (missing {missing[:3]}, unknown {extra[:3]})")
        for m, (out_f, in_f) in shapes.items():
            a, b = factors[m]
            r = task.spec.ranks[m]
            if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
                raise ReplyError(f"module {m!r}: got A{tuple(a.shape)} and B{tuple(b.shape)}, expected rank {r}: "
                                 f"A({r}, {in_f}) and B({out_f}, {r})")
        alpha = meta.get("alpha")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or float(alpha) != float(task.spec.alpha):
            raise ReplyError(f"alpha {alpha!r} differs from the client's {task.spec.alpha!r}")
        rslora = meta.get("rslora", False)
        if rslora is not task.spec.rslora:
            # Aggregating it anyway would mis-scale its update by sqrt(r); an engine whose messages
            # do not carry the flag must be stopped here, not trusted.
            raise ReplyError(f"rslora {rslora!r} differs from the client's {task.spec.rslora!r} (lora.rslora); "
                             "the engine must carry the flag to the client and back")
        update = ClientUpdate(factors=factors, num_examples=reply.num_examples, alpha=float(alpha),
                              client_id=task.spec.client_id, rslora=bool(rslora),
                              metadata={"train_loss": reply.train_loss, "steps": reply.steps})
        try:
            validate_round([update], check_finite=True)
        except AggregationError as exc:
            raise ReplyError(str(exc).removeprefix(update.label(0) + ", ").removeprefix(update.label(0) + ": ")) \
                from None
        return update

    # ------------------------------------------------------------------ fold
    def begin_fold(self, rnd: int, tasks: Sequence[ClientTask]) -> MethodFold:
        return LoRAFold(self, rnd, tasks)

    def decide(self, task: ClientTask, update: ClientUpdate) -> Any:
        """A per-client decision taken on its returned factors before they are released (HetLoRA's
        pruning); applied by :meth:`apply_decisions` once the round's state is installed."""
        return None

    def apply_decisions(self, rnd: int, decisions: Mapping[int, tuple[ClientTask, Any]]) -> dict[str, Any]:
        """Apply the round's decisions; returns entries of the round's record."""
        return {}

    def sent_factors(self, task: ClientTask) -> dict[str, Factors] | None:
        """The factors the task's client started from, the reference its contribution is measured
        from: the global adapter it was sent; for a fresh start, the round's shared adapter for
        factor averaging (its ``A`` counts), nothing for products (its product is zero)."""
        init = unpack_factors(task.tensors, "init/")
        if init:
            return init
        seed = task.meta.get("init_seed")
        if seed is not None and self.averages_factors:
            return fresh_factors(self.run.shapes, task.spec.ranks, int(seed))
        return None

    def checkpoint(self) -> dict[str, Any]:
        return self.bound.checkpoint()

    def restore(self, ckpt: Mapping[str, Any], where: str) -> None:
        self.bound.restore(ckpt)

    # ---------------------------------------------------------- global model
    def global_factors(self, ranks: Mapping[str, int]) -> dict[str, Factors]:
        assert self.state is not None
        return self.aggregator.distribute(self.state, dict(ranks), self.run.alpha, rslora=self.run.rslora)


class LoRAFold(MethodFold):
    """A round of a :class:`LoRAMethod`: each update folded into the aggregator's streaming
    accumulator as it arrives (the server never holds the round's updates together)."""

    def __init__(self, method: LoRAMethod, rnd: int, tasks: Sequence[ClientTask]) -> None:
        self.method = method
        self.rnd = rnd
        self._position = {id(t): i for i, t in enumerate(tasks)}
        self._tasks = list(tasks)
        self.acc = method.aggregator.begin_round(method.state, ranks=[t.spec.ranks for t in tasks])
        self.acc.clip_norm = method.bound.current()
        self.acc.noise = method.bound.noise(rnd, len(tasks))
        self.decisions: dict[int, tuple[ClientTask, Any]] = {}

    def add(self, task: ClientTask, update: ClientUpdate) -> None:
        # read_reply has validated the update on its own (and against the run's modules), so only the
        # checks across the round's clients run here. No copy: the orchestration releases the update
        # right after and never touches it again.
        shapes = self.method.run.shapes
        sent = self.method.sent_factors(task) if self.acc.clip_norm is not None else None
        self.acc.add_checked(update, {m: shapes[m] for m in update.factors}, copy=False, sent=sent)
        decision = self.method.decide(task, update)
        if decision is not None:
            self.decisions[task.client] = (task, decision)

    def finish(self, check: Callable[[list[str]], None]) -> dict[str, Any]:
        state = self.acc.finish()
        check(state.nonfinite_modules())
        self.method.state = state
        # In the tasks' order, whatever order the replies came in.
        ordered = dict(sorted(self.decisions.items(), key=lambda kv: self._position.get(id(kv[1][0]), 0)))
        # The clip records in the tasks' order too, so the metrics do not depend on arrival order.
        position = {t.spec.client_id: i for i, t in enumerate(self._tasks)}
        log = sorted(self.acc.clip_log, key=lambda r: position.get(r.client, len(position)))
        return {**self.method.apply_decisions(self.rnd, ordered),
                **self.method.bound.after_round(log, sampled=len(self._tasks))}
