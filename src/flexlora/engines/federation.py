"""One federated run, independent of the engine that moves its messages and of its method.

:class:`Federation` holds what a run *is* (model, data, partition, client types and ranks, eval
set, method, checkpoints, outputs) and the loop every engine shares:

1. :meth:`Federation.plan_round` samples the round's clients and asks the run's method
   (:mod:`flexlora.methods`) what each one's :class:`~flexlora.training.client.ClientTask` carries;
2. an *engine* delivers the tasks and yields one :class:`~flexlora.engines.rounds.ClientOutcome`
   per task as it arrives: the in-process engine (:mod:`flexlora.engines.simulation`) calls the
   method's ``client_train`` directly, the Flower engine (:mod:`flexlora.engines.flower`) sends
   one Message per node;
3. the round's :class:`~flexlora.engines.rounds.RoundFold` checks each reply, drops a bad or
   missing one by name, folds a good one into the method's fold at once, and at the end enforces
   ``min_clients`` and lets the method install the new global state;
4. :meth:`Federation.end_round` evaluates when due, writes the atomic checkpoint and the metrics.

The federation never branches on the method: what differs between methods is the method's.
"""

from __future__ import annotations

import dataclasses
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flexlora.core.aggregators import GlobalState
from flexlora.core.distributions import ClientType, sample_client_types, types_from_ranks
from flexlora.core.lowrank import stable_seed
from flexlora.core.types import AggregationError, Factors
from flexlora.data import Example, TaskData
from flexlora.engines.checkpoint import (
    CheckpointError,
    atomic_write_text,
    checkpoint_payload,
    restore_run,
    run_fingerprint,
    run_lock,
    save_checkpoint,
)
from flexlora.engines.config import ConfigError, EvalSection, RunConfig, method_sections, to_toml
from flexlora.engines.evaluation import Evaluation
from flexlora.engines.outputs import TensorBoardLog, export_run, write_metrics
from flexlora.engines.rounds import (
    ClientOutcome,
    Engine,
    FederationError,
    RoundFold,
    RunResult,
    deterministic_view,
    spectrum,
    tail_energy,
)
from flexlora.engines.run_setup import (
    client_types_for,
    encoding_options,
    examples_by_id,
    load_run_data,
    load_run_model,
    local_train_config,
    partition_of,
    resolve_device,
    round_size,
    sample_round_clients,
)
from flexlora.methods import ClientContext, ClientReply, Method, RunInfo, build_method, hetero_methods, method_class
from flexlora.training.client import ClientSpec, ClientTask
from flexlora.training.models import model_lora_targets, module_shapes

__all__ = ["ClientOutcome", "Engine", "Federation", "FederationError", "RunResult", "default_run_dir",
           "deterministic_view", "resolve_device", "run_fingerprint", "sample_round_clients"]


class Federation:
    """A federated fine-tuning run: its plan and the server's round logic, for any engine and method.

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

    def __init__(self, cfg: RunConfig, run_dir: Path, *, resume: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print, read_only: bool = False) -> None:
        if read_only and not resume:
            raise ValueError("read_only=True opens an existing run; it needs resume=True")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.read_only = read_only
        self.progress = progress
        self.log = log
        self.records: list[dict[str, Any]] = []
        self.start_round = 1
        self._restored_assignment: list[tuple[str, int, int, float]] | None = None
        self._setup()

    # ----------------------------------------------------------------- setup
    def _check_run_dir(self) -> None:
        if not self.resume and (self.run_dir / "checkpoints" / "latest.pt").exists():
            raise CheckpointError(f"{self.run_dir} already holds a run; continue it with --resume {self.run_dir}, "
                                  "or choose another --output")
        if not self.resume:
            # A run's results without its checkpoint (deleted, or a run killed before it wrote
            # one) are still results: a new run must not overwrite them.
            kept = [n for n in ("metrics.jsonl", "adapter", "checkpoints") if (self.run_dir / n).exists()]
            if kept:
                raise CheckpointError(f"{self.run_dir} already holds outputs of an earlier run ({', '.join(kept)}); "
                                      "choose another --output, or move them away first")
        if not self.read_only and self.run_dir.is_dir():
            # Fails now, before anything is written, if another run holds the directory (a directory
            # that does not exist yet is not created here: a refused start must leave nothing).
            probe = self._lock()
            if probe is not None:
                probe.close()

    def _setup(self) -> None:
        cfg = self.cfg
        self._check_run_dir()
        # A RunConfig changed in code after it was built skips validate(): its sections are
        # checked again here, so another method's options are refused by name.
        method_sections(cfg.aggregator, cfg.method_options)
        method_cls = method_class(cfg.aggregator)
        if (method_cls.homogeneous(cfg.options()) and cfg.rank_distribution != "homo" and not cfg.lora.ranks
                and len(client_types_for(cfg)) > 1):
            # Rejected before anything loads: averaging A and B entrywise needs one rank for all.
            raise AggregationError(
                f"aggregator {cfg.aggregator!r} needs every client at the same rank, but rank_distribution "
                f"is {cfg.rank_distribution!r}; use --set rank_distribution=homo, or a heterogeneous "
                f"aggregator ({', '.join(hetero_methods())})"
            )
        t0 = time.perf_counter()
        self.model, self.tokenizer, self.device = load_run_model(cfg)
        self.log(f"model {cfg.model} loaded in {time.perf_counter() - t0:.1f}s on {self.device}")

        self.data: TaskData = load_run_data(cfg)
        self.num_clients = cfg.num_clients or len(self.data.train)
        self.partition = partition_of(cfg, self.data)
        self._examples: dict[str, Example] = examples_by_id(self.data)

        groups = model_lora_targets(self.model)
        if cfg.lora.targets != "all":
            groups = {m: g for m, g in groups.items() if g == cfg.lora.targets}
        if not groups:
            raise ValueError(f"model {cfg.model!r} has no LoRA target modules of kind {cfg.lora.targets!r}")
        self.groups = groups
        self.shapes = module_shapes(self.model, list(groups))
        self._assign_types()
        self.method: Method = build_method(cfg.aggregator, cfg.method_options, RunInfo(
            shapes=self.shapes, groups=self.groups, alpha=cfg.lora.alpha, rslora=cfg.lora.rslora, seed=cfg.seed,
            init=cfg.lora.init, dtype=cfg.dtype, num_clients=self.num_clients, used_ranks=self.used_ranks,
            ranks_of=lambda k: self.type_ranks[self.client_type[k]], log=self.log, privacy=cfg.privacy,
            round_size=round_size(self.num_clients, cfg.clients_per_round), rounds=cfg.rounds))
        self.method.check_types()
        if not self.read_only:
            for note in self.method.notes():
                self.log(note)
            if round_size(self.num_clients, cfg.clients_per_round) == 1 and self.num_clients > 1:
                # A surprise otherwise: the global swings from one client's tasks to another's, and
                # Rouge-L on the unseen tasks can fall to 0 after a good round.
                self.log(f"note: clients_per_round = {cfg.clients_per_round:g} samples 1 of the {self.num_clients} "
                         "clients per round, so each round's global model is that one client's adapter (nothing is "
                         "averaged); raise clients_per_round to average several")
        self.train_cfg = local_train_config(cfg)
        self.encoding = encoding_options(cfg)
        self.evaluation = Evaluation(self)
        self.fingerprint = run_fingerprint(cfg)
        if self.resume:
            self._apply_assignment(restore_run(self))
        # Written only once every check has passed: a refused --resume (other settings, another
        # data set) must leave the run's config.toml and partition.json as they were.
        if not self.read_only:
            self.partition.save(self.run_dir / "partition.json")
            atomic_write_text(self.run_dir / "config.toml", to_toml(cfg))
            if self.resume:
                # The checkpoint's records are the truth: a kill between the checkpoint and
                # metrics.jsonl, or an edited file, is repaired here.
                write_metrics(self.run_dir / "metrics.jsonl", self.records)

    def _assign_types(self) -> None:
        cfg = self.cfg
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
            assignment = sample_client_types(self.num_clients, cfg.rank_distribution, types=client_types_for(cfg),
                                             seed=cfg.seed)
        # Clients are stored as an index into the distinct types: per-client state stays a few
        # bytes, so memory does not grow with the number of clients beyond that.
        self.types: list[ClientType] = sorted(set(assignment), key=lambda t: (t.attention_rank, t.mlp_rank, t.name))
        self.client_type = [self.types.index(t) for t in assignment]
        self.type_ranks = [t.module_ranks(self.shapes, self.groups) for t in self.types]

    def used_ranks(self) -> list[dict[str, int]]:
        """The per-module ranks of every client type some client holds."""
        return [self.type_ranks[i] for i in sorted(set(self.client_type))]

    @property
    def export_ranks(self) -> dict[str, int]:
        """The ranks of the exported and evaluated adapter: ``export.rank`` capped per module, or
        the largest client rank of each module."""
        if self.cfg.export.rank:
            return {m: min(self.cfg.export.rank, *s) for m, s in self.shapes.items()}
        used = self.used_ranks()
        return {m: max(r[m] for r in used) for m in self.shapes}

    @property
    def state(self) -> GlobalState | None:
        """The global adapter (the method's)."""
        return self.method.state

    @state.setter
    def state(self, value: GlobalState | None) -> None:
        self.method.state = value

    def set_client_type(self, k: int, client_type: ClientType) -> None:
        """Give client ``k`` the resource type its node declared (Flower's capability query).

        Must be called before :meth:`run`; the export rank and the method's largest rank follow.

        Raises
        ------
        ConfigError
            For a type the method cannot serve (the run is left as it was).
        """
        if not 0 <= k < self.num_clients:
            raise ValueError(f"client {k} is outside 0..{self.num_clients - 1}")
        before = (list(self.types), list(self.type_ranks), list(self.client_type))
        if client_type not in self.types:
            self.types.append(client_type)
            self.type_ranks.append(client_type.module_ranks(self.shapes, self.groups))
        self.client_type[k] = self.types.index(client_type)
        try:
            self.method.check_types()
        except ConfigError:
            self.types, self.type_ranks, self.client_type = before
            raise

    def _apply_assignment(self, restored: list[tuple[str, int, int, float]]) -> None:
        # The checkpoint's rank assignment is the run's (on Flower it came from the nodes), so that
        # `flexlora eval`/`export` and a resumed run use the ranks the clients really had.
        self._restored_assignment = restored
        if restored != self.assignment():
            for k, (name, att, mlp, alpha) in enumerate(restored):
                t = ClientType(name, att, mlp, alpha)
                if t not in self.types:
                    self.types.append(t)
                    self.type_ranks.append(t.module_ranks(self.shapes, self.groups))
                self.client_type[k] = self.types.index(t)
            self.method.check_types()

    def _check_restored_assignment(self) -> None:
        # Checked when the run starts rather than at load time: on Flower the nodes declare their
        # ranks (set_client_type) after the federation is built.
        if self._restored_assignment is not None and self._restored_assignment != self.assignment():
            diff = [k for k, (a, b) in enumerate(zip(self._restored_assignment, self.assignment())) if a != b]
            raise CheckpointError(f"the clients' ranks differ from the checkpoint's (clients {diff[:5]}); resume with "
                                  "the same rank assignment (the same node capabilities on Flower)")

    def assignment(self) -> list[tuple[str, int, int, float]]:
        """Each client's type as ``(name, attention rank, MLP rank, alpha)``."""
        return [(t.name, t.attention_rank, t.mlp_rank, float(t.alpha)) for t in (self.types[i] for i in self.client_type)]

    def use_eval_settings(self, section: EvalSection) -> None:
        """Evaluate with other ``eval.*`` settings (``flexlora eval RUN --set eval.KEY=VALUE``).

        The run's identity (its checkpoint fingerprint) stays that of its own config: eval
        settings do not change what was trained, so the run opens first and its eval set is then
        rebuilt. Use it with ``read_only=True``, so the run's config.toml keeps its own settings.
        """
        self.cfg = dataclasses.replace(self.cfg, eval=section)
        self.evaluation.build()

    # --------------------------------------------------------------- clients
    def client_spec(self, k: int) -> ClientSpec:
        t = self.client_type[k]
        return ClientSpec(client_id=f"client{k:05d}", ranks=self.method.client_ranks(k, self.type_ranks[t]),
                          alpha=self.types[t].alpha, type_name=self.types[t].name, rslora=self.cfg.lora.rslora)

    def client_examples(self, k: int) -> list[Example]:
        return [self._examples[i] for i in self.partition.clients[k]]

    def train_client(self, task: ClientTask, on_step: Callable[[int, float], None] | None = None) -> ClientReply:
        """Client ``task.client``'s round on this process's base model (the method's ``client_train``)."""
        ctx = ClientContext(self.model, self.tokenizer, self.client_examples(task.client), self.train_cfg,
                            self.encoding, dropout=self.cfg.lora.dropout, on_step=on_step)
        return type(self.method).client_train(ctx, task)

    def plan_round(self, rnd: int) -> list[ClientTask]:
        """The round's sampled clients, each with its own ranks, seed and the method's payload."""
        seed = self.cfg.seed
        if self.cfg.privacy.dp and not self.cfg.privacy.reproducible:
            # DP's amplification by sampling needs a sample nobody can predict from the config.
            seed = secrets.randbits(63)
        sampled = sample_round_clients(self.num_clients, self.cfg.clients_per_round, seed, rnd)
        specs = [(k, self.client_spec(k)) for k in sampled]
        payloads = self.method.plan(rnd, specs)
        return [ClientTask(round=rnd, client=k, spec=spec, seed=stable_seed("client", self.cfg.seed, rnd, k),
                           tensors=tensors, meta=meta) for (k, spec), (tensors, meta) in zip(specs, payloads)]

    def check_count(self, task: ClientTask, n: Any) -> str | None:
        """Why ``n`` examples cannot be client ``task.client``'s weight (None when they can)."""
        # The count is the client's weight p_k: a wrong one (a node on other data than it says, a
        # bug, an inflated claim) would skew the average without any other sign.
        expected = self.partition.num_examples(task.client)
        if isinstance(n, bool) or not isinstance(n, int) or n != expected:
            return (f"it claims {n!r} training examples, but partition {task.client} of the run's data holds "
                    f"{expected} (a node on other data must be started with its own data set: --node-config "
                    "\"data=PATH\")")
        return None

    def begin_aggregation(self, rnd: int, tasks: Sequence[ClientTask]) -> RoundFold:
        """Start folding round ``rnd``'s outcomes into the aggregate one at a time, as they arrive
        (streaming aggregation: the server never holds the round's updates together)."""
        return RoundFold(self, rnd, tasks)

    def aggregate_round(self, rnd: int, outcomes: Sequence[ClientOutcome]) -> dict[str, Any]:
        """Fold a list of the round's outcomes, in order, and return the round's record."""
        fold = self.begin_aggregation(rnd, [o.task for o in outcomes])
        for o in outcomes:
            fold.add(o)
        return fold.finish()

    def end_round(self, rnd: int, record: dict[str, Any], tb: TensorBoardLog | None = None) -> None:
        """Evaluate when due, then write the checkpoint, metrics.jsonl and TensorBoard for round ``rnd``."""
        if self._eval_due(rnd):
            record.update(self.evaluation.evaluate(answers=f"round_{rnd}"))
        if rnd == self.cfg.rounds and self.cfg.eval.per_type and self.evaluation.items and self.state is not None:
            record["rougeL_by_type"] = self.evaluation.per_type(answers=f"round_{rnd}")
        self.records.append(record)
        save_checkpoint(self.run_dir / "checkpoints", checkpoint_payload(self, rnd))
        write_metrics(self.run_dir / "metrics.jsonl", self.records)
        if tb is not None:
            tb.log(record)

    def _eval_due(self, rnd: int) -> bool:
        every = self.cfg.eval.every
        return rnd == self.cfg.rounds or (every > 0 and rnd % every == 0)

    # ----------------------------------------------------------- global model
    def spectrum(self, top: int = 8) -> dict[str, Any]:
        """The global update's leading singular values (:func:`~flexlora.engines.rounds.spectrum`)."""
        assert self.state is not None
        return spectrum(self.state, self.shapes, self.used_ranks(), top)

    def tail_energy(self) -> float:
        """The global update's energy beyond the smallest client rank (:func:`~flexlora.engines.rounds.tail_energy`)."""
        assert self.state is not None
        return tail_energy(self.state, self.shapes, self.used_ranks())

    def global_factors(self, rank: int | None = None) -> dict[str, Factors]:
        """The global adapter as LoRA factors at ``rank`` (default: the export rank), capped per
        module at ``min(out, in)``; with ``export.rank`` 0, the method's exact factors when it
        holds them (:meth:`flexlora.methods.Method.exact_factors`)."""
        assert self.state is not None
        if rank is None and not self.cfg.export.rank:
            exact = self.method.exact_factors()
            if exact is not None:
                return exact
        ranks = self.export_ranks if rank is None else {m: min(rank, *s) for m, s in self.shapes.items()}
        return self.method.global_factors(ranks)

    def evaluate(self, factors: dict[str, Factors] | None = None, *, with_loss: bool = True) -> dict[str, Any]:
        """Rouge-L and eval loss of the global model (:meth:`Evaluation.evaluate`)."""
        return self.evaluation.evaluate(factors, with_loss=with_loss)

    def evaluate_per_type(self) -> dict[str, float]:
        """Rouge-L of the global model as each client type receives it (:meth:`Evaluation.per_type`)."""
        return self.evaluation.per_type()

    @property
    def eval_items(self) -> list[tuple[str, list[int], tuple[str, ...]]]:
        return self.evaluation.items

    @property
    def eval_features(self) -> list[dict[str, list[int]]]:
        return self.evaluation.features

    @property
    def eval_examples(self) -> list[Example]:
        return self.evaluation.examples

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
                rec = {"round": 0, **self.evaluation.evaluate(answers="round_0")}
                self.records.append(rec)
                tb.log(rec)
                write_metrics(self.run_dir / "metrics.jsonl", self.records)
            if self.start_round == 1 and not (self.run_dir / "checkpoints" / "latest.pt").is_file():
                # A round-0 checkpoint, so that a run stopped in its first round (too few replies,
                # a kill) continues with --resume like one stopped later.
                save_checkpoint(self.run_dir / "checkpoints", checkpoint_payload(self, 0))
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
        return run_lock(self.run_dir)

    def finish(self, seconds: float) -> RunResult:
        """Export the adapter (PEFT format), plots and the summary (:func:`~flexlora.engines.outputs.export_run`)."""
        self.method.final_state(self.cfg.rounds)
        if self.state is None:
            raise RuntimeError("no round has run; nothing to export")
        return export_run(self, seconds)


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")

