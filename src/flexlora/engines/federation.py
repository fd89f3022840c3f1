"""One federated run, independent of the engine that moves its messages.

:class:`Federation` holds what a run *is* (model, data, partition, client types and ranks, eval
set, aggregator, checkpoints, outputs) and what the server does each round:

1. :meth:`Federation.plan_round` samples the round's clients and builds one
   :class:`~flexlora.training.client.ClientTask` per client (the global adapter distributed to
   its own ranks, its seed);
2. an *engine* delivers the tasks and yields one :class:`ClientOutcome` per task as it arrives:
   the in-process engine (:mod:`flexlora.engines.simulation`) calls
   :func:`~flexlora.training.client.run_client_task` directly, the Flower engine
   (:mod:`flexlora.engines.flower`) sends one Message per node;
3. the round's :class:`RoundFold` (:meth:`Federation.begin_aggregation`) checks each reply
   against what was asked (modules, shapes, ranks, finite values), drops a bad or missing one
   with a warning, folds a good one into the core aggregator's streaming accumulator at once,
   and at the end enforces ``min_clients`` and installs the new global state
   (:meth:`Federation.aggregate_round` does the same for a list of outcomes);
4. :meth:`Federation.end_round` evaluates when due, writes the atomic checkpoint and the metrics.

:meth:`Federation.run` is that loop, the same for every engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from flexlora.core.aggregators import Aggregator, GlobalState, get_aggregator
from flexlora.core.aggregators.hetlora import pruned_ranks
from flexlora.core.distributions import (
    PAPER_CLIENT_TYPES,
    ClientType,
    sample_client_types,
    type_counts,
    types_from_ranks,
)
from flexlora.core.lowrank import stable_seed
from flexlora.core.sparse import SparseUpdate, aggregate_sparse, lora_share, mask_counts, stage2_state
from flexlora.core.types import AggregationError, ClientUpdate, Factors, validate_round
from flexlora.data import (
    JSONL_FIELD_DEFAULTS,
    Example,
    TaskData,
    load_eval_data,
    load_task_data,
    partition_examples,
)
from flexlora.data.templates import encode_example, encode_prompt
from flexlora.engines.checkpoint import (
    CheckpointError,
    atomic_write_text,
    config_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from flexlora.engines.config import ConfigError, EvalSection, RunConfig, to_toml
from flexlora.engines.outputs import TensorBoardLog, plot_curves, summary_table, write_metrics
from flexlora.training.adapter import client_adapter
from flexlora.training.client import ClientSpec, ClientTask, EncodingOptions
from flexlora.training.evaluate import eval_loss, evaluate_generation
from flexlora.training.export import save_merged_model, save_peft_adapter
from flexlora.training.local import LocalTrainConfig
from flexlora.training.models import load_base_model, model_lora_targets, module_shapes
from flexlora.training.sparse import SparseTask, merged_sparse_change

TIME_KEYS = ("seconds", "eval_seconds", "aggregate_seconds")


class FederationError(RuntimeError):
    """A round cannot go on (too few valid client replies, no nodes); the last checkpoint is intact."""


def resolve_device(name: str) -> torch.device:
    """``"auto"`` picks CUDA, then MPS, then CPU.

    Raises
    ------
    ConfigError
        For a device this machine does not have (on Flower, a node whose hardware differs from
        the server's: ``device = "auto"`` lets each process pick its own).
    """
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps:
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"config key 'device': {name!r} is not a torch device ({exc}); use 'auto', 'cpu', "
                          "'cuda', 'cuda:N' or 'mps'") from exc
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ConfigError(f"config key 'device': {name!r}, but this machine has {found}; use device='auto' "
                          "(each process, each Flower node too, then picks what it has) or 'cpu'")
    if device.type == "mps" and not mps:
        raise ConfigError(f"config key 'device': {name!r}, but MPS is not available here; use device='auto' or 'cpu'")
    return device


def base_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def client_types_for(cfg: RunConfig) -> list[ClientType]:
    """The resource types of a run, smallest first, with the run's alpha."""
    if cfg.lora.types:
        return [ClientType(f"type{i + 1}", a, m, cfg.lora.alpha) for i, (a, m) in enumerate(cfg.lora.types)]
    return [ClientType(t.name, t.attention_rank, t.mlp_rank, cfg.lora.alpha) for t in PAPER_CLIENT_TYPES]


# Keys added after runs were first checkpointed, with their defaults: a key at its default is
# left out of the fingerprint, so that a run checkpointed before the key existed still resumes.
_LATER_KEYS: dict[tuple[str, str], Any] = {
    ("lora", "rslora"): False,
    ("lora", "init"): "shared",
    **{("data_options", k): v for k, v in JSONL_FIELD_DEFAULTS.items()},
    ("eval", "data"): "",
    ("eval", "stem"): False,
    ("train", "hetlora_prune"): True,
    ("train", "hetlora_prune_threshold"): 1e-3,
    ("train", "hetlora_min_rank"): 0,
    **{("eval", k): v for k, v in JSONL_FIELD_DEFAULTS.items()},
}


def run_fingerprint(cfg: RunConfig) -> str:
    """The identity of a run that a checkpoint must match to be resumed.

    Everything but ``rounds`` and the [flower] settings; keys added to the config later (such
    as ``lora.rslora``) count only when they differ from their default.
    """
    d = cfg.to_dict()
    if cfg.aggregator.lower() != "slora":
        d.pop("slora", None)  # no effect on other aggregators, and absent from older runs
    for (section, key), default in _LATER_KEYS.items():
        if section in d and key in d[section] and d[section][key] == default:
            d[section] = {k: v for k, v in d[section].items() if k != key}
    return config_fingerprint(d, ignore=("rounds", "flower"))


def local_train_config(cfg: RunConfig) -> LocalTrainConfig:
    """The local training settings of every client of a run."""
    t = cfg.train
    return LocalTrainConfig(
        optimizer=t.optimizer, lr=t.lr, weight_decay=t.weight_decay, momentum=t.momentum,
        micro_batch_size=t.micro_batch_size, grad_accum_steps=t.grad_accum_steps, local_steps=cfg.local_steps,
        epochs=t.epochs, max_grad_norm=t.max_grad_norm, lr_scheduler=t.lr_scheduler, warmup_steps=t.warmup_steps,
    )


def encoding_options(cfg: RunConfig) -> EncodingOptions:
    return EncodingOptions(cfg.train.template, cfg.train.cutoff_len, cfg.train.train_on_inputs)


def _field_options(section: Any) -> dict[str, str | None]:
    """The generic loader's field names set in a config section (``data_options`` or ``eval``).

    Only the ones that differ from the loader's defaults are passed on, since any field-name
    option makes the loader read a JSON file generically and rejects non-JSON sources; ``""``
    is the config's way to say "no such field" (``None``).
    """
    return {k: getattr(section, k) or None for k, default in JSONL_FIELD_DEFAULTS.items()
            if getattr(section, k) != default}


def load_run_data(cfg: RunConfig) -> TaskData:
    """The run's data set through the project's loaders, with the config's data options."""
    options: dict[str, Any] = _field_options(cfg.data_options)
    if cfg.data_options.max_per_task:
        options["max_per_task"] = cfg.data_options.max_per_task
    if cfg.data_options.unseen_tasks:
        options["unseen_tasks"] = list(cfg.data_options.unseen_tasks)
    return load_task_data(cfg.data, spec_key="data", option_prefix="data_options.", **options)


def load_run_eval_data(cfg: RunConfig) -> TaskData | None:
    """The separate evaluation set of ``eval.data`` (its tasks are ``unseen``), or ``None`` when unset.

    Raises
    ------
    DataError
        A missing or malformed ``eval.data``, or a record without a required field (the fix
        names the ``--set eval.*`` key to use).
    """
    e = cfg.eval
    if not e.data:
        return None
    return load_eval_data(e.data, max_per_task=e.max_examples_per_task or None, spec_key="eval.data",
                          option_prefix="eval.", **_field_options(e))


def sample_round_clients(num_clients: int, clients_per_round: float, seed: int, rnd: int) -> list[int]:
    """The clients of round ``rnd``: a seeded draw without replacement, sorted.

    ``clients_per_round`` below 1 is a fraction (at least one client); from 1 up it is a count.
    The draw depends only on ``(seed, rnd)``, so a resumed run samples the same clients.
    """
    m = max(1, round(clients_per_round * num_clients)) if clients_per_round < 1 else int(clients_per_round)
    m = min(m, num_clients)
    rng = np.random.default_rng([seed, rnd, 0x5A17])
    return sorted(int(i) for i in rng.choice(num_clients, size=m, replace=False))


@dataclass
class ClientOutcome:
    """What came back for one :class:`ClientTask`: an update, or the reason there is none.

    ``bytes_up``/``bytes_down`` are the factor bytes that crossed (or, in process, would cross)
    the wire; ``where`` names the node for logs (``None`` in process). ``own_data`` is set for a
    node that trains on its own data set rather than partition ``task.client`` of the run's data:
    only then is the update's example count (its aggregation weight) taken on trust.
    """

    task: ClientTask
    update: ClientUpdate | None = None
    failure: str | None = None
    train_loss: float = math.nan
    steps: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    where: str | None = None
    own_data: bool = False


class RoundFold:
    """One round's replies, folded into the aggregate as they arrive (from
    :meth:`Federation.begin_aggregation`).

    :meth:`add` checks an outcome against its task, folds a valid update into the aggregator's
    :class:`~flexlora.core.aggregators.base.RoundAccumulator` and releases its factors (the
    outcome keeps ``update=None``); :meth:`finish` enforces ``min_clients``, installs the new
    global state and returns the round's record. SLoRA's stage-1 sparse changes are kept until
    :meth:`finish` (their average is one weighted sum over the round).
    """

    def __init__(self, fed: Federation, rnd: int, tasks: Sequence[ClientTask]) -> None:
        self.fed = fed
        self.rnd = rnd
        self.outcomes: list[ClientOutcome] = []
        self.valid: list[tuple[ClientOutcome, int]] = []  # (outcome, its number of examples)
        self.dropped: list[dict[str, str]] = []
        self.prune: dict[int, dict[str, int]] = {}
        self.sparse: list[Any] = []
        self.seconds = 0.0
        self.stage1 = fed.in_slora_stage1(rnd)
        self._position = {id(t): i for i, t in enumerate(tasks)}
        self.acc = None if self.stage1 else fed.aggregator.begin_round(fed.state, ranks=[t.spec.ranks for t in tasks])

    def add(self, o: ClientOutcome) -> None:
        """Check ``o`` and fold its update in (or record why it is dropped)."""
        fed = self.fed
        self.outcomes.append(o)
        reason = o.failure
        if reason is None and o.update is None:
            reason = "no reply"
        if reason is None:
            assert o.update is not None
            reason = fed.check_update(o.task, o.update, own_data=o.own_data)
        if reason is None:
            assert o.update is not None
            t0 = time.perf_counter()
            try:
                if self.acc is None:
                    self.sparse.append(o.update)
                else:
                    # No copy: the update is released right below and never touched again.
                    self.acc.add(o.update, copy=False)  # type: ignore[arg-type]
            except AggregationError as exc:
                reason = str(exc)
            self.seconds += time.perf_counter() - t0
        if reason is not None:
            where = f" on {o.where}" if o.where else ""
            fed.log(f"warning: round {self.rnd}: {o.task.spec.client_id}{where} dropped from this round: {reason}")
            self.dropped.append({"client": o.task.spec.client_id, "where": o.where or "", "reason": reason})
            return
        assert o.update is not None
        self.valid.append((o, int(o.update.num_examples)))
        decision = fed._prune_decision(o) if self.acc is not None else None
        if decision is not None:
            self.prune[o.task.client] = decision
        if self.acc is not None:
            o.update = None  # folded: the factors are not kept

    def finish(self) -> dict[str, Any]:
        """Install the round's global state and return its record.

        Raises
        ------
        FederationError
            When fewer than ``min_clients`` valid updates arrived, or the aggregate is not finite;
            the state is left as it was.
        """
        fed, rnd = self.fed, self.rnd
        # The record lists the clients in the tasks' order, whatever order their replies came in.
        pos = lambda o: self._position.get(id(o.task), len(self._position))  # noqa: E731
        outcomes = sorted(self.outcomes, key=pos)
        self.valid.sort(key=lambda v: pos(v[0]))
        need = max(1, fed.cfg.min_clients)
        if len(self.valid) < need:
            raise FederationError(
                f"round {rnd}: {len(self.valid)} of {len(outcomes)} sampled clients returned a valid update, fewer "
                f"than min_clients = {need} ({'; '.join(d['client'] + ': ' + d['reason'] for d in self.dropped)[:600]}). "
                f"The checkpoint of round {rnd - 1} in {fed.run_dir} is intact: bring the nodes back (or lower "
                f"min_clients with --set min_clients=N) and continue with --resume {fed.run_dir}"
            )
        t0 = time.perf_counter()
        if self.stage1:
            change = aggregate_sparse(self.sparse, fed.slora_counts(), previous=fed.slora_change)
            self._check_finite(rnd, [m for m, v in change.items() if not bool(torch.isfinite(v).all())])
            fed.slora_change = change
            self.sparse = []
            if rnd == fed.cfg.slora.stage1_rounds:
                fed.state = fed._slora_stage2_state(rnd)
        else:
            assert self.acc is not None
            state = self.acc.finish()
            self._check_finite(rnd, state.nonfinite_modules())
            fed.state = state
        agg_seconds = self.seconds + (time.perf_counter() - t0)
        pruned_now: dict[str, dict[str, Any]] = {}
        for o, _ in self.valid:
            new = self.prune.get(o.task.client)
            if new is not None:
                fed.pruned[o.task.client] = new
                pruned_now[o.task.spec.client_id] = _rank_summary(new, fed.groups)
                fed.log(f"round {rnd}: {o.task.spec.client_id} pruned its ranks to {pruned_now[o.task.spec.client_id]}")
        group_losses: dict[str, list[float]] = {}
        for o, _ in self.valid:
            group_losses.setdefault(o.task.spec.type_name, []).append(o.train_loss)
        record: dict[str, Any] = {
            "round": rnd,
            "clients": [o.task.spec.client_id for o in outcomes],
            "train_loss": float(np.average([o.train_loss for o, _ in self.valid], weights=[n for _, n in self.valid])),
            "groups": {g: {"clients": len(v), "train_loss": float(np.mean(v))} for g, v in sorted(group_losses.items())},
            "bytes_up": int(sum(o.bytes_up for o in outcomes)),
            "bytes_down": int(sum(o.bytes_down for o in outcomes)),
            "bytes": {o.task.spec.client_id: {"type": o.task.spec.type_name, "up": int(o.bytes_up),
                                              "down": int(o.bytes_down)} for o in outcomes},
            "aggregate_seconds": agg_seconds,
        }
        if fed.state is not None:
            record["spectrum"] = fed._spectrum()
            record["tail_energy"] = fed.tail_energy()
        if fed.is_slora:
            record["slora_stage"] = 1 if self.stage1 else 2
        record["ranks"] = {o.task.spec.client_id: _rank_summary(o.task.spec.ranks, fed.groups) for o in outcomes}
        if pruned_now:
            record["pruned"] = pruned_now
        if self.dropped:
            record["dropped"] = self.dropped
        return record


    def _check_finite(self, rnd: int, bad: list[str]) -> None:
        # Every update was checked on arrival; this is the last guard before the new state is
        # installed and checkpointed over the previous round's.
        if bad:
            raise FederationError(
                f"round {rnd}: the aggregated global update is not finite in {len(bad)} module(s) "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); it was not installed. The checkpoint "
                f"of round {rnd - 1} in {self.fed.run_dir} is intact: continue with --resume {self.fed.run_dir} "
                "(lower train.lr if the clients' training diverges)"
            )


class Engine(Protocol):
    """Moves one round's tasks to the clients and their replies back."""

    def train_round(self, fed: Federation, rnd: int, tasks: Sequence[ClientTask]) -> Iterable[ClientOutcome]:
        """One outcome per task, yielded as each arrives (the federation folds it in at once, so an
        engine that yields instead of collecting never holds the round's updates together)."""
        ...


@dataclass
class RunResult:
    """What :meth:`Federation.run` returns."""

    run_dir: Path
    records: list[dict[str, Any]]
    summary: str


class Federation:
    """A federated fine-tuning run: its plan and the server's round logic, for any engine.

    Parameters
    ----------
    cfg : RunConfig
    run_dir : Path
        Output directory (created). With ``resume=True`` it must hold a checkpoint.
    resume : bool, default False
        Continue from ``run_dir/checkpoints/latest.pt``.
    progress : bool, default True
        Show progress bars.
    log : callable, default print
        Where status lines and warnings go.
    read_only : bool, default False
        Open a run to evaluate or export it (``flexlora eval``/``export``; needs ``resume=True``):
        the federation rewrites nothing in ``run_dir`` (not its config.toml, not partition.json),
        so eval overrides leave the run as it was; ``export`` then writes only the adapter asked for.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        *,
        resume: bool = False,
        progress: bool = True,
        log: Callable[[str], None] = print,
        read_only: bool = False,
    ) -> None:
        if read_only and not resume:
            raise ValueError("read_only=True opens an existing run; it needs resume=True")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.read_only = read_only
        self.progress = progress
        self.log = log
        self.records: list[dict[str, Any]] = []
        self.state: GlobalState | None = None
        self.start_round = 1
        self._restored_assignment: list[tuple[str, int, int, float]] | None = None
        # HetLoRA's self-pruned ranks: client -> per-module ranks, for the clients that pruned.
        self.pruned: dict[int, dict[str, int]] = {}
        # SLoRA's stage-1 global change (values on each module's largest mask prefix).
        self.slora_change: dict[str, torch.Tensor] | None = None
        self._setup()

    # ----------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg = self.cfg
        if not self.resume and (self.run_dir / "checkpoints" / "latest.pt").exists():
            raise CheckpointError(
                f"{self.run_dir} already holds a run; continue it with --resume {self.run_dir}, "
                "or choose another --output"
            )
        if not self.resume:
            # A run's results without its checkpoint (deleted, or a run killed before it wrote
            # one) are still results: a new run must not overwrite them.
            kept = [n for n in ("metrics.jsonl", "adapter", "checkpoints") if (self.run_dir / n).exists()]
            if kept:
                raise CheckpointError(
                    f"{self.run_dir} already holds outputs of an earlier run ({', '.join(kept)}); choose another "
                    "--output, or move them away first"
                )
        if not self.read_only and self.run_dir.is_dir():
            # Fails now, before anything is written, if another run holds the directory (a directory
            # that does not exist yet is not created here: a refused start must leave nothing).
            probe = self._lock()
            if probe is not None:
                probe.close()
        homo_only = cfg.aggregator.lower() in ("fedavg", "fedit") or (
            cfg.aggregator.lower() == "slora" and cfg.slora.then == "fedit")
        if homo_only and cfg.rank_distribution != "homo" and not cfg.lora.ranks:
            # Rejected before anything loads: FedAvg averages A and B entrywise, so all ranks must agree.
            if len(client_types_for(cfg)) > 1:
                raise AggregationError(
                    f"aggregator {cfg.aggregator!r} needs every client at the same rank, but rank_distribution "
                    f"is {cfg.rank_distribution!r}; use --set rank_distribution=homo, or a heterogeneous "
                    "aggregator (flexlora, hetlora, flora)"
                )
        self.device = resolve_device(cfg.device)
        t0 = time.perf_counter()
        self.model, self.tokenizer = load_base_model(cfg.model, dtype=base_dtype(cfg.dtype))
        self.model.to(self.device)
        self.model.requires_grad_(False)
        self.model.eval()
        self.log(f"model {cfg.model} loaded in {time.perf_counter() - t0:.1f}s on {self.device}")

        self.data: TaskData = load_run_data(cfg)
        self.num_clients = cfg.num_clients or len(self.data.train)
        self.partition = partition_examples(
            self.data, self.num_clients, cfg.data_options.partition, alpha=cfg.data_options.dirichlet_alpha,
            seed=cfg.seed,
        )
        self._examples: dict[str, Example] = {ex.id: ex for exs in self.data.train.values() for ex in exs}

        groups = model_lora_targets(self.model)
        if cfg.lora.targets != "all":
            groups = {m: g for m, g in groups.items() if g == cfg.lora.targets}
        if not groups:
            raise ValueError(f"model {cfg.model!r} has no LoRA target modules of kind {cfg.lora.targets!r}")
        self.groups = groups
        self.shapes = module_shapes(self.model, list(groups))

        if cfg.lora.ranks:
            if len(cfg.lora.ranks) != self.num_clients:
                raise ConfigError(
                    f"config key 'lora.ranks': gives {len(cfg.lora.ranks)} ranks but the run has {self.num_clients} "
                    f"clients (num_clients = {cfg.num_clients}{', one per task' if not cfg.num_clients else ''}); "
                    "give one rank per client, or set num_clients"
                )
            assignment = types_from_ranks([r if isinstance(r, int) else tuple(r) for r in cfg.lora.ranks],
                                          alpha=cfg.lora.alpha)
        else:
            assignment = sample_client_types(
                self.num_clients, cfg.rank_distribution, types=client_types_for(cfg), seed=cfg.seed
            )
        # Clients are stored as an index into the distinct types: per-client state stays a few
        # bytes, so memory does not grow with the number of clients beyond that.
        self.types: list[ClientType] = sorted(set(assignment), key=lambda t: (t.attention_rank, t.mlp_rank, t.name))
        self.client_type = [self.types.index(t) for t in assignment]
        self._type_ranks = [t.module_ranks(self.shapes, self.groups) for t in self.types]
        self._make_aggregator()
        if (self.is_flora or self.is_slora) and cfg.dtype != "float32" and not self.read_only:
            self.log(f"warning: {cfg.aggregator} adds the global update to the {cfg.dtype} base weights, so it is "
                     f"kept only to {cfg.dtype}'s precision relative to each weight (about "
                     f"{'0.4' if cfg.dtype == 'bfloat16' else '0.05'}%); dtype=float32 keeps it exactly")

        self.train_cfg = local_train_config(cfg)
        self.encoding = encoding_options(cfg)
        self._build_eval_set()
        self.fingerprint = run_fingerprint(cfg)
        if self.resume:
            self._restore()
        # Written only once every check has passed: a refused --resume (other settings, another
        # data set) must leave the run's config.toml and partition.json as they were.
        if not self.read_only:
            self.partition.save(self.run_dir / "partition.json")
            atomic_write_text(self.run_dir / "config.toml", to_toml(cfg))
            if self.resume:
                # The checkpoint's records are the truth: a kill between the checkpoint and
                # metrics.jsonl, or an edited file, is repaired here.
                write_metrics(self.run_dir / "metrics.jsonl", self.records)

    def _make_aggregator(self) -> None:
        cfg = self.cfg
        # Over the types some client holds (a node's declared type may replace the run's draw).
        used = [self._type_ranks[i] for i in sorted(set(self.client_type))]
        self.max_rank = max(max(r.values()) for r in used)
        agg_opts = dict(cfg.aggregator_options)
        self.is_slora = cfg.aggregator.lower() == "slora"
        # SLoRA's stage 2 is FedIT or FlexLoRA; its stage 1 is handled by the federation itself.
        name = cfg.slora.then if self.is_slora else cfg.aggregator
        if name.lower() == "flexlora":
            agg_opts.setdefault("max_rank", self.max_rank)
            given = agg_opts["max_rank"]
            if isinstance(given, int) and not isinstance(given, bool) and given < self.max_rank:
                raise ConfigError(f"aggregator_options.max_rank = {given} is below the largest client rank of the "
                                  f"run ({self.max_rank}): those clients could not be sent their best approximation; "
                                  f"leave max_rank out (it defaults to {self.max_rank}) or set it to at least that")
        self.aggregator: Aggregator = get_aggregator(name, **agg_opts)
        self.is_flora = self.aggregator.name == "flora"
        if cfg.export.rank:
            self.export_ranks = {m: min(cfg.export.rank, *s) for m, s in self.shapes.items()}
        else:  # the largest client rank of each module
            self.export_ranks = {m: max(r[m] for r in used) for m in self.shapes}

    def set_client_type(self, k: int, client_type: ClientType) -> None:
        """Give client ``k`` the resource type its node declared (Flower's capability query).

        Must be called before :meth:`run`; the export rank and FlexLoRA's ``max_rank`` follow.
        """
        if not 0 <= k < self.num_clients:
            raise ValueError(f"client {k} is outside 0..{self.num_clients - 1}")
        before = (list(self.types), list(self._type_ranks), list(self.client_type))
        if client_type not in self.types:
            self.types.append(client_type)
            self._type_ranks.append(client_type.module_ranks(self.shapes, self.groups))
        self.client_type[k] = self.types.index(client_type)
        try:
            self._make_aggregator()
        except ConfigError:
            # A type the run's settings cannot serve (a rank above aggregator_options.max_rank)
            # leaves the run as it was.
            self.types, self._type_ranks, self.client_type = before
            self._make_aggregator()
            raise

    def use_eval_settings(self, section: EvalSection) -> None:
        """Evaluate with other ``eval.*`` settings (``flexlora eval RUN --set eval.KEY=VALUE``).

        The run's identity (its checkpoint fingerprint) stays that of its own config: eval
        settings do not change what was trained, so the run opens first and its eval set is then
        rebuilt. Use it with ``read_only=True``, so the run's config.toml keeps its own settings.
        """
        self.cfg = dataclasses.replace(self.cfg, eval=section)
        self._build_eval_set()

    def _build_eval_set(self) -> None:
        cfg = self.cfg.eval
        separate = load_run_eval_data(self.cfg)
        source = self.data.unseen if separate is None else separate.unseen
        if separate is not None:
            self.log(f"evaluating on eval.data {cfg.data}: {len(source)} tasks")
            shared = sorted(set(source) & set(self.data.train))
            if shared:
                self.log(f"warning: eval.data tasks {shared[:5]} are also training tasks, so their scores "
                         "are not zero-shot")
        tasks = sorted(source)
        if cfg.max_tasks:
            tasks = tasks[: cfg.max_tasks]
        self.eval_items: list[tuple[str, list[int], tuple[str, ...]]] = []
        self.eval_features: list[dict[str, list[int]]] = []
        # The examples behind eval_items, in the same order (what was evaluated, for inspection).
        self.eval_examples: list[Example] = []
        for task in tasks:
            exs = source[task]
            if cfg.max_examples_per_task:
                exs = exs[: cfg.max_examples_per_task]
            self.eval_examples.extend(exs)
            for ex in exs:
                prompt = encode_prompt(self.tokenizer, ex, template=self.encoding.template,
                                       cutoff_len=self.encoding.cutoff_len)
                self.eval_items.append((task, prompt, ex.references or (ex.output,)))
                self.eval_features.append(
                    encode_example(self.tokenizer, ex, template=self.encoding.template,
                                   cutoff_len=self.encoding.cutoff_len, train_on_inputs=False)
                )

    # --------------------------------------------------------------- clients
    def client_spec(self, k: int) -> ClientSpec:
        t = self.client_type[k]
        ranks = self.pruned.get(k) or self._type_ranks[t]
        return ClientSpec(client_id=f"client{k:05d}", ranks=ranks, alpha=self.types[t].alpha,
                          type_name=self.types[t].name, rslora=self.cfg.lora.rslora)

    def client_examples(self, k: int) -> list[Example]:
        return [self._examples[i] for i in self.partition.clients[k]]

    def _assignment(self) -> list[tuple[str, int, int, float]]:
        return [(t.name, t.attention_rank, t.mlp_rank, float(t.alpha)) for t in (self.types[i] for i in self.client_type)]

    # ----------------------------------------------------------------- resume
    def _checkpoint_payload(self, rnd: int) -> dict[str, Any]:
        py_version, py_state, py_gauss = random.getstate()
        return {
            "round": rnd,
            "fingerprint": self.fingerprint,
            "config": self.cfg.to_dict(),
            "global_state": self.state.state_dict() if self.state is not None else None,
            "assignment": [list(a) for a in self._assignment()],
            "pruned_ranks": {str(k): dict(v) for k, v in sorted(self.pruned.items())},
            "slora_change": dict(self.slora_change) if self.slora_change is not None else None,
            "partition_hash": self.partition.manifest()["hash"],
            "records": self.records,
            "rng": {"torch": torch.get_rng_state(), "python": list(py_state), "python_version": py_version,
                    "python_gauss": py_gauss},
        }

    def _restore(self) -> None:
        where = self.run_dir / "checkpoints" / "latest.pt"
        if self.read_only and not where.is_file():
            raise CheckpointError(f"{self.run_dir} has no checkpoint yet (no round has finished), so there is no "
                                  "global adapter to evaluate or export; run it first (flexlora run --resume "
                                  "continues a run that has one)")
        ckpt = load_checkpoint(self.run_dir / "checkpoints")
        missing = [k for k in ("round", "fingerprint", "partition_hash", "assignment", "global_state", "records",
                               "rng") if k not in ckpt]
        if missing:
            raise CheckpointError(f"checkpoint {where} is malformed (no {', '.join(missing)}); delete it to restart "
                                  "the run")
        done = ckpt["round"]
        if isinstance(done, bool) or not isinstance(done, int) or done < 0:
            raise CheckpointError(f"checkpoint {where} is malformed (round {done!r}); delete it to restart the run")
        if self.read_only and done == 0:
            raise CheckpointError(f"{self.run_dir} has finished no round yet (its checkpoint is of round 0), so there "
                                  "is no global adapter to evaluate or export; continue it with flexlora run --resume")
        if not isinstance(ckpt["records"], list) or not all(isinstance(r, dict) for r in ckpt["records"]):
            raise CheckpointError(f"checkpoint {where} is malformed (its records are not a list of rounds); delete "
                                  "it to restart the run")
        if done > self.cfg.rounds:
            raise CheckpointError(f"{self.run_dir} has already run {done} rounds, more than rounds = {self.cfg.rounds}; "
                                  f"resume with --set rounds={done} or more")
        if ckpt["fingerprint"] != self.fingerprint:
            # min_clients only decides whether a round is accepted, never what it computes: after
            # nodes were lost a run may continue with fewer. It is part of the fingerprint (older
            # checkpoints hold it), so a change of it alone is recognised here.
            then = (ckpt.get("config") or {}).get("min_clients") if isinstance(ckpt.get("config"), dict) else None
            if (isinstance(then, int) and not isinstance(then, bool) and then != self.cfg.min_clients
                    and run_fingerprint(dataclasses.replace(self.cfg, min_clients=then)) == ckpt["fingerprint"]):
                self.log(f"min_clients changed from {then} to {self.cfg.min_clients} for the rounds left")
            else:
                raise CheckpointError(
                    f"the checkpoint in {self.run_dir} was written with a different configuration; resume with the "
                    "run's own config.toml (only `rounds`, `min_clients` and the [flower] settings may change)"
                )
        if ckpt["partition_hash"] != self.partition.manifest()["hash"]:
            raise CheckpointError("the data partition differs from the checkpoint's (did the data change?)")
        try:
            self._restored_assignment = [(str(a[0]), int(a[1]), int(a[2]), float(a[3])) for a in ckpt["assignment"]]
            self.state = (
                GlobalState.from_state_dict(ckpt["global_state"]) if ckpt["global_state"] is not None else None
            )
            self.records = list(ckpt["records"])
            self.pruned = {int(k): {str(m): int(r) for m, r in v.items()}
                           for k, v in ckpt.get("pruned_ranks", {}).items()}
            change = ckpt.get("slora_change")
            self.slora_change = {str(m): v for m, v in change.items()} if change is not None else None
            self.start_round = int(ckpt["round"]) + 1
            rng = ckpt["rng"]
            torch.set_rng_state(rng["torch"])
            random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as exc:
            raise CheckpointError(
                f"checkpoint {self.run_dir / 'checkpoints'} is malformed ({exc!r}); delete it to restart the run"
            ) from exc
        if self.state is not None:
            if self.state.shapes != self.shapes:
                odd = sorted(set(self.state.shapes.items()) ^ set(self.shapes.items()))[:3]
                raise CheckpointError(f"checkpoint {where}: its global adapter does not fit model {self.cfg.model!r} "
                                      f"(modules or shapes differ: {odd}); delete it to restart the run")
            bad = self.state.nonfinite_modules()
            if bad:
                raise CheckpointError(f"checkpoint {where}: its global adapter holds NaN or Inf in {bad[:3]}; delete "
                                      "it to restart the run")
        if self.slora_change is not None:
            odd = sorted(set(self.slora_change) - set(self.shapes))
            bad = [m for m, v in self.slora_change.items()
                   if not isinstance(v, torch.Tensor) or not bool(torch.isfinite(v).all())]
            if odd or bad:
                raise CheckpointError(f"checkpoint {where}: its SLoRA stage-1 change is malformed (modules the model "
                                      f"lacks: {odd[:3]}; non-finite or not tensors: {bad[:3]}); delete it to restart "
                                      "the run")
        for k, ranks in self.pruned.items():
            if not 0 <= k < self.num_clients or set(ranks) != set(self.shapes) or any(r < 1 for r in ranks.values()):
                raise CheckpointError(f"checkpoint {where}: its pruned ranks of client {k} do not fit this run; "
                                      "delete it to restart the run")
        # The checkpoint's rank assignment is the run's (on Flower it came from the nodes), so that
        # `flexlora eval`/`export` and a resumed run use the ranks the clients really had.
        if self._restored_assignment != self._assignment():
            if len(self._restored_assignment) != self.num_clients:
                raise CheckpointError("the checkpoint's rank assignment has a different number of clients")
            for k, (name, att, mlp, alpha) in enumerate(self._restored_assignment):
                t = ClientType(name, att, mlp, alpha)
                if t not in self.types:
                    self.types.append(t)
                    self._type_ranks.append(t.module_ranks(self.shapes, self.groups))
                self.client_type[k] = self.types.index(t)
            self._make_aggregator()
        if self.read_only:
            self.log(f"opened {self.run_dir} at round {ckpt['round']}")
        else:
            self.log(f"resuming {self.run_dir} after round {ckpt['round']}")

    def _check_restored_assignment(self) -> None:
        # Checked when the run starts rather than at load time: on Flower the nodes declare their
        # ranks (set_client_type) after the federation is built.
        if self._restored_assignment is not None and self._restored_assignment != self._assignment():
            diff = [k for k, (a, b) in enumerate(zip(self._restored_assignment, self._assignment())) if a != b]
            raise CheckpointError(
                f"the clients' ranks differ from the checkpoint's (clients {diff[:5]}); resume with the same "
                "rank assignment (the same node capabilities on Flower)"
            )

    # ------------------------------------------------------------------ round
    def plan_round(self, rnd: int) -> list[ClientTask]:
        """The round's sampled clients, each with its own ranks, seed and distributed global adapter."""
        sampled = sample_round_clients(self.num_clients, self.cfg.clients_per_round, self.cfg.seed, rnd)
        hetlora = (
            (self.cfg.train.hetlora_strength, self.cfg.train.hetlora_gamma)
            if self.aggregator.name == "hetlora" and self.cfg.train.hetlora_strength > 0
            else None
        )
        base_delta = None
        if self.is_flora and self.state is not None:
            base_delta = self.aggregator.stacked(  # type: ignore[attr-defined]
                self.state, self.cfg.lora.alpha, rslora=self.cfg.lora.rslora)
        if self.in_slora_stage1(rnd):
            return [ClientTask(round=rnd, client=k, spec=self.client_spec(k), init=None,
                               seed=stable_seed("client", self.cfg.seed, rnd, k),
                               sparse=SparseTask(self.slora_counts(k), self.cfg.seed, self.slora_change))
                    for k in sampled]
        # Clients without a global adapter to start from (round 1; every FLoRA round) all start
        # from the round's one fresh adapter, so that averaging factors averages training, not
        # independent random initialisations (flexlora.core.initial). lora.init = "per-client"
        # (product aggregators only) leaves each client to PEFT's initialisation under its own seed.
        init_seed = stable_seed("init", self.cfg.seed, rnd) if self.cfg.lora.init == "shared" else None
        tasks = []
        for k in sampled:
            spec = self.client_spec(k)
            init = None
            if self.state is not None and not self.is_flora:
                init = self.aggregator.distribute(self.state, spec.ranks, spec.alpha, rslora=spec.rslora)
            tasks.append(ClientTask(round=rnd, client=k, spec=spec, init=init, base_delta=base_delta,
                                    seed=stable_seed("client", self.cfg.seed, rnd, k), hetlora=hetlora,
                                    init_seed=init_seed if init is None else None))
        return tasks

    # ---------------------------------------------------------------- SLoRA
    def in_slora_stage1(self, rnd: int) -> bool:
        """Whether round ``rnd`` is one of SLoRA's sparse stage-1 rounds."""
        return self.is_slora and rnd <= self.cfg.slora.stage1_rounds

    def slora_counts(self, k: int | None = None) -> dict[str, int]:
        """Stage-1 mask size per module of client ``k`` (its type's density), or, for ``None``, the
        largest over the run's client types (the support of the global change)."""
        d = self.cfg.slora.density

        def of(ranks: dict[str, int]) -> dict[str, int]:
            return mask_counts(self.shapes, d if d > 0 else {m: lora_share(ranks[m], s)
                                                              for m, s in self.shapes.items()})

        if k is not None:
            return of(self._type_ranks[self.client_type[k]])
        per_type = [of(self._type_ranks[i]) for i in sorted(set(self.client_type))]
        return {m: max(c[m] for c in per_type) for m in self.shapes}

    def _slora_stage2_state(self, rnd: int) -> GlobalState:
        # Stage 2 starts from the SVD of the whole stage-1 change (not from scratch).
        assert self.slora_change is not None
        then = self.cfg.slora.then
        ranks = self.max_rank if then == "flexlora" else self._type_ranks[self.client_type[0]]
        return stage2_state(self.slora_change, self.shapes, self.cfg.seed, then=then, max_rank=ranks,
                            alpha=self.cfg.lora.alpha, rslora=self.cfg.lora.rslora, round=rnd)

    def _check_sparse(self, task: ClientTask, update: Any) -> str | None:
        if not isinstance(update, SparseUpdate):
            return f"a stage-1 SLoRA round needs sparse changes, got {type(update).__name__}"
        assert task.sparse is not None
        if set(update.values) != set(self.shapes):
            return "the sparse change's modules differ from the run's"
        for m, k in task.sparse.counts.items():
            v = update.values[m]
            if tuple(v.shape) != (k,):
                return f"module {m!r}: sparse change of shape {tuple(v.shape)}, expected ({k},)"
            if not torch.isfinite(v).all():
                return f"module {m!r}: the sparse change holds NaN or Inf"
        if update.num_examples <= 0:
            return f"num_examples is {update.num_examples}"
        return None

    def _check_count(self, task: ClientTask, update: Any) -> str | None:
        # The count is the client's weight p_k: a wrong one (a node on other data than it says, a
        # bug, an inflated claim) would skew the average without any other sign.
        n, expected = update.num_examples, self.partition.num_examples(task.client)
        if isinstance(n, bool) or not isinstance(n, int) or n != expected:
            return (f"it claims {n!r} training examples, but partition {task.client} of the run's data holds "
                    f"{expected} (a node on other data must be started with its own data set: --node-config "
                    "\"data=PATH\")")
        return None

    def check_update(self, task: ClientTask, update: ClientUpdate, *, own_data: bool = False) -> str | None:
        """Why ``update`` cannot be aggregated as the reply to ``task`` (None when it can).

        Checks the module set, each module's shape and rank against what the client was asked
        to train, the alpha and scaling rule, the example count and that every value is finite
        (for an SLoRA stage-1 task: the sparse change's modules, sizes and values). The example
        count must equal the client's partition size, unless ``own_data`` (the node trained on
        its own data set, whose size the server cannot know).
        """
        if task.sparse is not None:
            return self._check_sparse(task, update) or (None if own_data else self._check_count(task, update))
        if not isinstance(update, ClientUpdate):
            return f"expected LoRA factors, got {type(update).__name__}"
        if update.client_id is not None and update.client_id != task.spec.client_id:
            return f"the reply is labelled {update.client_id!r}, but the task was {task.spec.client_id!r}'s"
        missing = sorted(set(self.shapes) - set(update.factors))
        extra = sorted(set(update.factors) - set(self.shapes))
        if missing or extra:
            return f"modules differ from the run's (missing {missing[:3]}, unknown {extra[:3]})"
        for m, (out_f, in_f) in self.shapes.items():
            a, b = update.factors[m]
            r = task.spec.ranks[m]
            if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
                return (f"module {m!r}: got A{tuple(a.shape)} and B{tuple(b.shape)}, expected rank {r}: "
                        f"A({r}, {in_f}) and B({out_f}, {r})")
        if float(update.alpha) != float(task.spec.alpha):
            return f"alpha {update.alpha!r} differs from the client's {task.spec.alpha!r}"
        if update.rslora is not task.spec.rslora:
            # Aggregating it anyway would mis-scale its update by sqrt(r); an engine whose messages
            # do not carry the flag (it then defaults to False) must be stopped here, not trusted.
            return (f"rslora {update.rslora!r} differs from the client's {task.spec.rslora!r} (lora.rslora); "
                    "the engine must carry the flag to the client and back")
        try:
            validate_round([update], check_finite=self.aggregator.check_finite)
        except AggregationError as exc:
            return str(exc).removeprefix(update.label(0) + ", ").removeprefix(update.label(0) + ": ")
        return None if own_data else self._check_count(task, update)

    def aggregate_round(self, rnd: int, outcomes: Sequence[ClientOutcome]) -> dict[str, Any]:
        """Validate the round's outcomes, aggregate the valid ones and return the round's record
        (:meth:`begin_aggregation`, each outcome added in the given order, then finished).

        Raises
        ------
        FederationError
            When fewer than ``min_clients`` valid updates arrived, or the aggregate is not finite;
            the state is left as it was.
        """
        fold = self.begin_aggregation(rnd, [o.task for o in outcomes])
        for o in outcomes:
            fold.add(o)
        return fold.finish()

    def begin_aggregation(self, rnd: int, tasks: Sequence[ClientTask]) -> RoundFold:
        """Start folding round ``rnd``'s outcomes into the aggregate one at a time, as they arrive
        (streaming aggregation: the server never holds the round's updates together)."""
        return RoundFold(self, rnd, tasks)

    def _prune_decision(self, o: ClientOutcome) -> dict[str, int] | None:
        """HetLoRA's rank self-pruning, decided on a client's returned factors: the ranks it trains
        at in its next rounds (never below the floor), or None when they do not change."""
        t = self.cfg.train
        if self.aggregator.name != "hetlora" or not t.hetlora_prune:
            return None
        assert o.update is not None
        used = sorted(set(self.client_type))
        floor = {m: t.hetlora_min_rank or min(self._type_ranks[i][m] for i in used) for m in self.shapes}
        old = o.task.spec.ranks
        keep = pruned_ranks(o.update.factors, gamma=t.hetlora_gamma, threshold=t.hetlora_prune_threshold)
        new = {m: max(min(keep[m], old[m]), min(floor[m], old[m])) for m in old}
        return new if new != old else None

    def end_round(self, rnd: int, record: dict[str, Any], tb: TensorBoardLog | None = None) -> None:
        """Evaluate when due, then write the checkpoint, metrics.jsonl and TensorBoard for round ``rnd``."""
        if self._eval_due(rnd):
            record.update(self.evaluate())
        # Inside SLoRA's stage 1 there is no LoRA to distribute, so no per-type score.
        if rnd == self.cfg.rounds and self.cfg.eval.per_type and self.eval_items and self.state is not None:
            record["rougeL_by_type"] = self.evaluate_per_type()
        self.records.append(record)
        save_checkpoint(self.run_dir / "checkpoints", self._checkpoint_payload(rnd))
        write_metrics(self.run_dir / "metrics.jsonl", self.records)
        if tb is not None:
            tb.log(record)

    def _spectrum(self, top: int = 8) -> dict[str, Any]:
        """Leading singular values of the first adapted module's global update, and the first one
        beyond each client rank of that module (``beyond_ranks``: direction ``r + 1``, which the
        clients of rank ``r`` are not sent), to watch the rank collapse of the tail directions
        across rounds (method.md, section 2)."""
        assert self.state is not None
        m = next(iter(self.shapes))
        st = self.state.modules[m]
        s = st.svd.S if st.svd is not None else st.to_svd().S
        ranks = sorted({self._type_ranks[i][m] for i in set(self.client_type)})
        return {"module": m, "top": [float(x) for x in s[:top]], "rank_held": int(s.shape[0]),
                "beyond_ranks": {str(r): float(s[r]) for r in ranks if r < s.shape[0]}}

    def tail_energy(self) -> float:
        """Share of the global update's energy beyond the smallest client rank, over every module:
        ``sum_m sum_{i > r_min(m)} s_i^2 / sum_m sum_i s_i^2`` (the "rank collapse" measure)."""
        assert self.state is not None
        used = sorted(set(self.client_type))
        tail = total = 0.0
        for m in self.shapes:
            st = self.state.modules[m]
            s2 = (st.svd.S if st.svd is not None else st.to_svd().S).double() ** 2
            r_min = min(self._type_ranks[i][m] for i in used)
            tail += float(s2[r_min:].sum())
            total += float(s2.sum())
        return tail / total if total > 0 else 0.0

    # ------------------------------------------------------------- evaluation
    def global_factors(self, rank: int | None = None) -> dict[str, Factors]:
        """The global adapter as LoRA factors at ``rank`` (default: the export rank), capped per
        module at ``min(out, in)``. FLoRA with ``export.rank`` 0 gives the exact stacked update."""
        assert self.state is not None
        if rank is None and self.is_flora and not self.cfg.export.rank:
            return self.aggregator.stacked(  # type: ignore[attr-defined]
                self.state, self.cfg.lora.alpha, rslora=self.cfg.lora.rslora)
        ranks = self.export_ranks if rank is None else {m: min(rank, *s) for m, s in self.shapes.items()}
        return self.aggregator.distribute(self.state, ranks, self.cfg.lora.alpha, rslora=self.cfg.lora.rslora)

    def evaluate(self, factors: dict[str, Factors] | None = None, *, with_loss: bool = True) -> dict[str, Any]:
        """Rouge-L of greedy answers (and the eval loss) on the unseen tasks.

        ``factors`` defaults to the current global adapter at the export rank; before the first
        round (no global state) the base model is evaluated.
        """
        if not self.eval_items:
            return {}
        t0 = time.perf_counter()
        cfg = self.cfg.eval
        if factors is None and self.state is not None:
            factors = self.global_factors()
        if factors is None and self.slora_change is not None:
            # Inside SLoRA's stage 1 the global model is W0 plus the sparse change itself.
            ctx: contextlib.AbstractContextManager = _with_model(
                merged_sparse_change(self.model, self.slora_change, self.shapes, self.cfg.seed), self.model)
        elif factors is None:
            ctx = contextlib.nullcontext(self.model)
        else:
            ranks = {m: a.shape[0] for m, (a, _) in factors.items()}
            ctx = client_adapter(self.model, ranks, self.cfg.lora.alpha, factors, rslora=self.cfg.lora.rslora)
        with ctx as model:
            model.eval()
            gen = evaluate_generation(model, self.tokenizer, self.eval_items, max_new_tokens=cfg.max_new_tokens,
                                      batch_size=cfg.batch_size, stem=cfg.stem)
            loss = eval_loss(model, self.eval_features, batch_size=cfg.loss_batch_size) if with_loss else None
        out: dict[str, Any] = {"rougeL": gen.overall, "rougeL_per_task": gen.per_task}
        if with_loss:
            out["eval_loss"] = loss
        out["eval_examples"] = len(self.eval_items)
        out["eval_seconds"] = time.perf_counter() - t0
        return out

    def evaluate_per_type(self) -> dict[str, float]:
        """Rouge-L of the global model as each client type receives it (distributed to its ranks)."""
        assert self.state is not None
        out = {}
        used = sorted(set(self.client_type))
        for i in used:
            t, ranks = self.types[i], self._type_ranks[i]
            if self.is_flora:
                # FLoRA clients do not receive a truncated adapter; they train on the full global.
                continue
            factors = self.aggregator.distribute(self.state, ranks, t.alpha, rslora=self.cfg.lora.rslora)
            out[t.name] = self.evaluate(factors, with_loss=False)["rougeL"]
        return out

    def _eval_due(self, rnd: int) -> bool:
        every = self.cfg.eval.every
        return rnd == self.cfg.rounds or (every > 0 and rnd % every == 0)

    # -------------------------------------------------------------------- run
    def run(self, engine: Engine) -> RunResult:
        """Run (or continue) the federation to ``cfg.rounds`` rounds through ``engine``, writing every output."""
        cfg = self.cfg
        from tqdm.auto import tqdm

        self._check_restored_assignment()
        lock = self._lock()
        tb = TensorBoardLog(self.run_dir / "tensorboard")
        t_start = time.perf_counter()
        try:
            if self.start_round == 1 and cfg.eval.baseline and not any(r["round"] == 0 for r in self.records):
                self.log("evaluating the base model (round 0)")
                rec = {"round": 0, **self.evaluate()}
                self.records.append(rec)
                tb.log(rec)
                write_metrics(self.run_dir / "metrics.jsonl", self.records)
            if self.start_round == 1 and not (self.run_dir / "checkpoints" / "latest.pt").is_file():
                # A round-0 checkpoint, so that a run stopped in its first round (too few replies,
                # a kill) continues with --resume like one stopped later.
                save_checkpoint(self.run_dir / "checkpoints", self._checkpoint_payload(0))
            rounds_bar = tqdm(total=cfg.rounds, initial=self.start_round - 1, desc="rounds", unit="round",
                              disable=not self.progress, position=0)
            for rnd in range(self.start_round, cfg.rounds + 1):
                t0 = time.perf_counter()
                tasks = self.plan_round(rnd)
                fold = self.begin_aggregation(rnd, tasks)
                for outcome in engine.train_round(self, rnd, tasks):
                    fold.add(outcome)  # folded as it arrives; the engine need not keep the round's updates
                rec = fold.finish()
                rec["seconds"] = time.perf_counter() - t0
                self.end_round(rnd, rec, tb)
                msg = f"round {rnd}/{cfg.rounds}: train loss {rec['train_loss']:.4f}"
                if "rougeL" in rec:
                    msg += f", Rouge-L {rec['rougeL']:.4f}, eval loss {rec['eval_loss']:.4f}"
                rounds_bar.update(1)
                msg += f" ({rec['seconds']:.1f}s)"
                if self.progress:  # print above the bars instead of through them
                    tqdm.write(msg, file=sys.stderr)
                else:
                    self.log(msg)
            rounds_bar.close()
            return self.finish(time.perf_counter() - t_start)
        finally:
            tb.close()
            if lock is not None:
                lock.close()  # releases the lock

    def _lock(self) -> Any:
        """Hold ``run_dir/.lock`` exclusively (``flock``) while this process writes the run; the
        open file is returned and the lock released when it is closed (or the process ends).

        Raises
        ------
        CheckpointError
            Another process (or another open run in this one) is writing this directory.
        """
        try:
            import fcntl
        except ImportError:  # no flock on this platform: runs are not guarded against a second writer
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.run_dir / ".lock", "a")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise CheckpointError(
                f"{self.run_dir} is being written by another flexlora run right now; wait for it to finish, or "
                "choose another --output"
            ) from None
        return fh

    def finish(self, seconds: float) -> RunResult:
        """Export the adapter (PEFT format), plots and the summary."""
        if self.state is None and self.slora_change is not None:
            # A run that ends inside SLoRA's stage 1 exports the LoRA its stage 2 would start from.
            self.state = self._slora_stage2_state(self.cfg.rounds)
        if self.state is None:
            raise RuntimeError("no round has run; nothing to export")
        factors = self.global_factors()
        save_peft_adapter(self.model, factors, self.cfg.lora.alpha, self.run_dir / "adapter",
                          base_model_name_or_path=self.cfg.model, rslora=self.cfg.lora.rslora)
        if self.cfg.export.merged:
            save_merged_model(self.model, self.tokenizer, factors, self.cfg.lora.alpha, self.run_dir / "merged",
                              rslora=self.cfg.lora.rslora)
        plot_curves(self.records, self.run_dir / "plots")
        counts = type_counts([self.types[t] for t in self.client_type])
        info = {
            "run_dir": str(self.run_dir),
            "model": self.cfg.model,
            "aggregator": self.aggregator.name,
            "clients (per type)": ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
            "rounds": self.cfg.rounds,
            "time (this process)": f"{seconds:.0f}s",
            "peak memory": f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
            "adapter": str(self.run_dir / "adapter"),
        }
        summary = summary_table(self.records, info)
        atomic_write_text(self.run_dir / "summary.txt", summary)
        return RunResult(self.run_dir, self.records, summary)


@contextlib.contextmanager
def _with_model(ctx: contextlib.AbstractContextManager, model: Any) -> Any:
    with ctx:
        yield model


def _rank_summary(ranks: Mapping[str, int], groups: Mapping[str, str]) -> dict[str, Any]:
    """A client's ranks per module group: one int when the group's modules agree, else [min, max]."""
    by: dict[str, list[int]] = {}
    for m, r in ranks.items():
        by.setdefault(groups.get(m, "other"), []).append(r)
    return {g: v[0] if min(v) == max(v) else [min(v), max(v)] for g, v in sorted(by.items())}


def deterministic_view(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics without wall-clock fields (what must match bit for bit across a resume or engines)."""
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")
