"""The in-process federated simulation: one process, one shared base model, clients in turn.

Each round: sample clients, distribute the global adapter to each client's ranks, train each
client (:func:`flexlora.training.client.train_client`), aggregate, evaluate every k rounds, and
write an atomic checkpoint from which ``--resume`` continues bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexlora.core.aggregators import Aggregator, GlobalState, get_aggregator
from flexlora.core.distributions import (
    PAPER_CLIENT_TYPES,
    ClientType,
    sample_client_types,
    type_counts,
    types_from_ranks,
)
from flexlora.core.lowrank import stable_seed
from flexlora.core.types import Factors
from flexlora.data import Example, TaskData, load_task_data, partition_examples
from flexlora.data.templates import encode_example, encode_prompt
from flexlora.engines.checkpoint import (
    CheckpointError,
    atomic_write_text,
    config_fingerprint,
    load_checkpoint,
    save_checkpoint,
)
from flexlora.engines.config import RunConfig, to_toml
from flexlora.engines.outputs import TensorBoardLog, plot_curves, summary_table, write_metrics
from flexlora.training.adapter import client_adapter
from flexlora.training.client import ClientSpec, EncodingOptions, factor_bytes, train_client
from flexlora.training.evaluate import eval_loss, evaluate_generation
from flexlora.training.export import save_merged_model, save_peft_adapter
from flexlora.training.local import LocalTrainConfig
from flexlora.training.models import load_base_model, model_lora_targets, module_shapes

_TIME_KEYS = ("seconds", "eval_seconds")


def resolve_device(name: str) -> torch.device:
    """``"auto"`` picks CUDA, then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def client_types_for(cfg: RunConfig) -> list[ClientType]:
    """The resource types of a run, smallest first, with the run's alpha."""
    if cfg.lora.types:
        return [ClientType(f"type{i + 1}", a, m, cfg.lora.alpha) for i, (a, m) in enumerate(cfg.lora.types)]
    return [ClientType(t.name, t.attention_rank, t.mlp_rank, cfg.lora.alpha) for t in PAPER_CLIENT_TYPES]


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
class RunResult:
    """What :meth:`Simulation.run` returns."""

    run_dir: Path
    records: list[dict[str, Any]]
    summary: str


class Simulation:
    """A federated fine-tuning run in one process.

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
        Where status lines go.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        *,
        resume: bool = False,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.progress = progress
        self.log = log
        self.records: list[dict[str, Any]] = []
        self.state: GlobalState | None = None
        self.start_round = 1
        # Fault injection for the resume tests: "R:C" sends SIGKILL to this process right after
        # the C-th client of round R has trained (mid-round, before its checkpoint).
        kill = os.environ.get("FLEXLORA_KILL_AT")
        self._kill_at = tuple(int(x) for x in kill.split(":")) if kill else None
        self._setup()

    # ----------------------------------------------------------------- setup
    def _setup(self) -> None:
        cfg = self.cfg
        if not self.resume and (self.run_dir / "checkpoints" / "latest.pt").exists():
            raise CheckpointError(
                f"{self.run_dir} already holds a run; continue it with --resume {self.run_dir}, "
                "or choose another --output"
            )
        self.device = resolve_device(cfg.device)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
        t0 = time.perf_counter()
        self.model, self.tokenizer = load_base_model(cfg.model, dtype=dtype)
        self.model.to(self.device)
        self.model.requires_grad_(False)
        self.model.eval()
        self.log(f"model {cfg.model} loaded in {time.perf_counter() - t0:.1f}s on {self.device}")

        options: dict[str, Any] = {}
        if cfg.data_options.max_per_task:
            options["max_per_task"] = cfg.data_options.max_per_task
        if cfg.data_options.unseen_tasks:
            options["unseen_tasks"] = list(cfg.data_options.unseen_tasks)
        self.data: TaskData = load_task_data(cfg.data, **options)
        n_train_tasks = len(self.data.train)
        self.num_clients = cfg.num_clients or n_train_tasks
        self.partition = partition_examples(
            self.data,
            self.num_clients,
            cfg.data_options.partition,
            alpha=cfg.data_options.dirichlet_alpha,
            seed=cfg.seed,
        )
        self.partition.save(self.run_dir / "partition.json")
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
                raise ValueError(
                    f"lora.ranks gives {len(cfg.lora.ranks)} ranks but the run has {self.num_clients} clients"
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
        self.max_rank = max(max(r.values()) for r in self._type_ranks)

        agg_opts = dict(cfg.aggregator_options)
        if cfg.aggregator.lower() == "flexlora":
            agg_opts.setdefault("max_rank", self.max_rank)
        self.aggregator: Aggregator = get_aggregator(cfg.aggregator, **agg_opts)
        self.is_flora = self.aggregator.name == "flora"
        if cfg.export.rank:
            self.export_ranks = {m: min(cfg.export.rank, *s) for m, s in self.shapes.items()}
        else:  # the largest client rank of each module
            self.export_ranks = {m: max(r[m] for r in self._type_ranks) for m in self.shapes}

        self.train_cfg = LocalTrainConfig(
            optimizer=cfg.train.optimizer,
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            momentum=cfg.train.momentum,
            micro_batch_size=cfg.train.micro_batch_size,
            grad_accum_steps=cfg.train.grad_accum_steps,
            local_steps=cfg.local_steps,
            epochs=cfg.train.epochs,
            max_grad_norm=cfg.train.max_grad_norm,
            lr_scheduler=cfg.train.lr_scheduler,
            warmup_steps=cfg.train.warmup_steps,
        )
        self.encoding = EncodingOptions(cfg.train.template, cfg.train.cutoff_len, cfg.train.train_on_inputs)
        self._build_eval_set()
        self.fingerprint = config_fingerprint(cfg.to_dict())
        atomic_write_text(self.run_dir / "config.toml", to_toml(cfg))
        if self.resume:
            self._restore()

    def _build_eval_set(self) -> None:
        cfg = self.cfg.eval
        tasks = sorted(self.data.unseen)
        if cfg.max_tasks:
            tasks = tasks[: cfg.max_tasks]
        self.eval_items: list[tuple[str, list[int], tuple[str, ...]]] = []
        self.eval_features: list[dict[str, list[int]]] = []
        for task in tasks:
            exs = self.data.unseen[task]
            if cfg.max_examples_per_task:
                exs = exs[: cfg.max_examples_per_task]
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
        return ClientSpec(client_id=f"client{k:05d}", ranks=self._type_ranks[t], alpha=self.types[t].alpha,
                          type_name=self.types[t].name)

    def client_examples(self, k: int) -> list[Example]:
        return [self._examples[i] for i in self.partition.clients[k]]

    # ----------------------------------------------------------------- resume
    def _checkpoint_payload(self, rnd: int) -> dict[str, Any]:
        py_version, py_state, py_gauss = random.getstate()
        return {
            "round": rnd,
            "fingerprint": self.fingerprint,
            "config": self.cfg.to_dict(),
            "global_state": self.state.state_dict() if self.state is not None else None,
            "client_type": list(self.client_type),
            "types": [[t.name, t.attention_rank, t.mlp_rank, float(t.alpha)] for t in self.types],
            "partition_hash": self.partition.manifest()["hash"],
            "records": self.records,
            "rng": {"torch": torch.get_rng_state(), "python": list(py_state), "python_version": py_version,
                    "python_gauss": py_gauss},
        }

    def _restore(self) -> None:
        ckpt = load_checkpoint(self.run_dir / "checkpoints")
        if ckpt["fingerprint"] != self.fingerprint:
            raise CheckpointError(
                f"the checkpoint in {self.run_dir} was written with a different configuration; resume with the "
                "run's own config.toml (only `rounds` may change)"
            )
        if ckpt["partition_hash"] != self.partition.manifest()["hash"]:
            raise CheckpointError("the data partition differs from the checkpoint's (did the data change?)")
        if list(ckpt["client_type"]) != self.client_type:
            raise CheckpointError("the rank assignment differs from the checkpoint's")
        self.state = (
            GlobalState.from_state_dict(ckpt["global_state"]) if ckpt["global_state"] is not None else None
        )
        self.records = list(ckpt["records"])
        self.start_round = int(ckpt["round"]) + 1
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
        self.log(f"resuming {self.run_dir} after round {ckpt['round']}")

    # ------------------------------------------------------------------ round
    @contextlib.contextmanager
    def _global_in_base(self) -> Iterator[None]:
        """FLoRA: clients train a fresh LoRA on top of ``W0 + global``. The global update is added
        to the base weights for the round and the original weights are put back bit for bit."""
        if not self.is_flora or self.state is None:
            yield
            return
        modules = dict(self.model.named_modules())
        saved = {}
        try:
            with torch.no_grad():
                for m in self.shapes:
                    w = modules[m].weight
                    saved[m] = w.detach().clone()
                    w.add_(self.state.dense(m).to(w))
            yield
        finally:
            with torch.no_grad():
                for m, w0 in saved.items():
                    modules[m].weight.copy_(w0)

    def run_round(self, rnd: int, sampled: list[int], bar: Any = None) -> dict[str, Any]:
        """Train the round's ``sampled`` clients, aggregate, and return its metrics record."""
        t0 = time.perf_counter()
        updates = []
        bytes_up = bytes_down = 0
        group_losses: dict[str, list[float]] = {}
        losses, weights = [], []
        hetlora = (
            (self.cfg.train.hetlora_strength, self.cfg.train.hetlora_gamma)
            if self.aggregator.name == "hetlora" and self.cfg.train.hetlora_strength > 0
            else None
        )
        with self._global_in_base():
            for k in sampled:
                spec = self.client_spec(k)
                init = None
                if self.state is not None and not self.is_flora:
                    init = self.aggregator.distribute(self.state, spec.ranks, spec.alpha)
                    bytes_down += factor_bytes(init)
                examples = self.client_examples(k)
                on_step = None
                if bar is not None:
                    bar.set_postfix_str(f"round {rnd} {spec.client_id} ({spec.type_name})")

                    def on_step(step: int, loss: float) -> None:
                        bar.update(1)

                update, result = train_client(
                    self.model, self.tokenizer, spec, examples, init, self.train_cfg,
                    seed=stable_seed("client", self.cfg.seed, rnd, k), encoding=self.encoding,
                    hetlora=hetlora, dropout=self.cfg.lora.dropout, on_step=on_step,
                )
                bytes_up += factor_bytes(update.factors)
                updates.append(update)
                losses.append(result.mean_loss)
                weights.append(len(examples))
                group_losses.setdefault(spec.type_name, []).append(result.mean_loss)
                if self._kill_at == (rnd, len(updates)):
                    os.kill(os.getpid(), signal.SIGKILL)
        self.state = self.aggregator.aggregate(updates, previous=self.state)
        del updates
        record: dict[str, Any] = {
            "round": rnd,
            "clients": [self.client_spec(k).client_id for k in sampled],
            "train_loss": float(np.average(losses, weights=weights)),
            "groups": {g: {"clients": len(v), "train_loss": float(np.mean(v))} for g, v in sorted(group_losses.items())},
            "bytes_up": int(bytes_up),
            "bytes_down": int(bytes_down),
            "spectrum": self._spectrum(),
        }
        record["seconds"] = time.perf_counter() - t0
        return record

    def _spectrum(self, top: int = 8) -> dict[str, Any]:
        """Leading singular values of the first adapted module's global update, to watch the
        rank collapse of the tail directions across rounds (method.md, section 2)."""
        assert self.state is not None
        m = next(iter(self.shapes))
        st = self.state.modules[m]
        s = st.svd.S if st.svd is not None else st.to_svd().S
        return {"module": m, "top": [float(x) for x in s[:top]], "rank_held": int(s.shape[0])}

    # ------------------------------------------------------------- evaluation
    def global_factors(self, rank: int | None = None) -> dict[str, Factors]:
        """The global adapter as LoRA factors at ``rank`` (default: the export rank), capped per
        module at ``min(out, in)``. FLoRA with ``export.rank`` 0 gives the exact stacked update."""
        assert self.state is not None
        if rank is None and self.is_flora and not self.cfg.export.rank:
            return self.aggregator.stacked(self.state, self.cfg.lora.alpha)  # type: ignore[attr-defined]
        ranks = self.export_ranks if rank is None else {m: min(rank, *s) for m, s in self.shapes.items()}
        return self.aggregator.distribute(self.state, ranks, self.cfg.lora.alpha)

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
        if factors is None:
            ctx: contextlib.AbstractContextManager = contextlib.nullcontext(self.model)
        else:
            ranks = {m: a.shape[0] for m, (a, _) in factors.items()}
            ctx = client_adapter(self.model, ranks, self.cfg.lora.alpha, factors)
        with ctx as model:
            model.eval()
            gen = evaluate_generation(model, self.tokenizer, self.eval_items, max_new_tokens=cfg.max_new_tokens,
                                      batch_size=cfg.batch_size)
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
        for t, ranks in zip(self.types, self._type_ranks):
            if self.is_flora:
                # FLoRA clients do not receive a truncated adapter; they train on the full global.
                continue
            factors = self.aggregator.distribute(self.state, ranks, t.alpha)
            out[t.name] = self.evaluate(factors, with_loss=False)["rougeL"]
        return out

    def _eval_due(self, rnd: int) -> bool:
        every = self.cfg.eval.every
        return rnd == self.cfg.rounds or (every > 0 and rnd % every == 0)

    # -------------------------------------------------------------------- run
    def run(self) -> RunResult:
        """Run (or continue) the federation to ``cfg.rounds`` rounds and write every output."""
        cfg = self.cfg
        from tqdm.auto import tqdm

        tb = TensorBoardLog(self.run_dir / "tensorboard")
        t_start = time.perf_counter()
        try:
            if self.start_round == 1 and cfg.eval.baseline and not any(r["round"] == 0 for r in self.records):
                self.log("evaluating the base model (round 0)")
                rec = {"round": 0, **self.evaluate()}
                self.records.append(rec)
                tb.log(rec)
                write_metrics(self.run_dir / "metrics.jsonl", self.records)
            rounds_bar = tqdm(total=cfg.rounds, initial=self.start_round - 1, desc="rounds", unit="round",
                              disable=not self.progress, position=0)
            for rnd in range(self.start_round, cfg.rounds + 1):
                sampled = sample_round_clients(self.num_clients, cfg.clients_per_round, cfg.seed, rnd)
                steps = sum(self.train_cfg.num_steps(len(self.partition.clients[k])) for k in sampled)
                with tqdm(total=steps, desc=f"round {rnd}/{cfg.rounds}", unit="step", disable=not self.progress,
                          leave=False, position=1) as bar:
                    rec = self.run_round(rnd, sampled, bar)
                if self._eval_due(rnd):
                    rec.update(self.evaluate())
                if rnd == cfg.rounds and cfg.eval.per_type and self.eval_items:
                    rec["rougeL_by_type"] = self.evaluate_per_type()
                self.records.append(rec)
                save_checkpoint(self.run_dir / "checkpoints", self._checkpoint_payload(rnd))
                write_metrics(self.run_dir / "metrics.jsonl", self.records)
                tb.log(rec)
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
        finally:
            tb.close()
        return self.finish(time.perf_counter() - t_start)

    def finish(self, seconds: float) -> RunResult:
        """Export the adapter (PEFT format), plots and the summary."""
        if self.state is None:
            raise RuntimeError("no round has run; nothing to export")
        factors = self.global_factors()
        save_peft_adapter(self.model, factors, self.cfg.lora.alpha, self.run_dir / "adapter",
                          base_model_name_or_path=self.cfg.model)
        if self.cfg.export.merged:
            save_merged_model(self.model, self.tokenizer, factors, self.cfg.lora.alpha, self.run_dir / "merged")
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


def deterministic_view(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics without wall-clock fields (what must match bit for bit across a resume)."""
    return [{k: v for k, v in r.items() if k not in _TIME_KEYS} for r in records]


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")

