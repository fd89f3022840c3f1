"""What a run writes beside its checkpoints: metrics.jsonl, TensorBoard events, PNG plots and the
end-of-run summary table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flexlora.engines.checkpoint import atomic_write_text


def write_metrics(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` from all records (atomically, so a resumed run never holds
    a half-written line or rounds the checkpoint does not know about)."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class TensorBoardLog:
    """Scalars of each round as TensorBoard events under ``run_dir/tensorboard``.

    A resumed run writes a new events file; TensorBoard merges them by step.
    """

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but keep runs alive without it
            self._writer = None
            return
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            return
        step = int(record["round"])
        for key in ("train_loss", "eval_loss", "rougeL", "seconds", "bytes_up", "bytes_down"):
            v = record.get(key)
            if isinstance(v, int | float):
                self._writer.add_scalar(key, v, step)
        for name, v in (record.get("rougeL_by_type") or {}).items():
            self._writer.add_scalar(f"rougeL_by_type/{name}", v, step)
        for group, vals in (record.get("groups") or {}).items():
            for k, v in vals.items():
                if isinstance(v, int | float):
                    self._writer.add_scalar(f"groups/{group}/{k}", v, step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def plot_curves(records: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """PNG plots of the training loss, eval loss and Rouge-L over rounds; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title in (("train_loss", "Local training loss"), ("eval_loss", "Eval loss (unseen tasks)"),
                       ("rougeL", "Rouge-L on unseen tasks")):
        pts = [(r["round"], r[key]) for r in records if isinstance(r.get(key), int | float)]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def summary_table(records: Sequence[dict[str, Any]], info: dict[str, Any]) -> str:
    """A one-screen text summary: Rouge-L before and after, per client type, time and memory."""
    from rich.console import Console
    from rich.table import Table

    evals = [r for r in records if isinstance(r.get("rougeL"), int | float)]
    first = evals[0] if evals else None
    last = evals[-1] if evals else None
    table = Table(title=f"flexlora run: {info.get('run_dir', '')}", show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    if first is not None and last is not None:
        table.add_row(f"Rouge-L unseen, round {first['round']}", f"{first['rougeL']:.4f}")
        table.add_row(f"Rouge-L unseen, round {last['round']}", f"{last['rougeL']:.4f}")
        table.add_row("change", f"{last['rougeL'] - first['rougeL']:+.4f}")
    if first is not None:
        for name, score in sorted(((records[-1].get("rougeL_by_type") or {}).items())):
            table.add_row(f"Rouge-L unseen, {name} (at its ranks)", f"{first['rougeL']:.4f} -> {score:.4f}")
    if last is not None and isinstance(last.get("eval_loss"), int | float):
        table.add_row("eval loss (last)", f"{last['eval_loss']:.4f}")
    groups: dict[str, list[float]] = {}
    for r in records:
        for g, v in (r.get("groups") or {}).items():
            if isinstance(v.get("train_loss"), int | float):
                groups.setdefault(g, []).append(v["train_loss"])
    for g in sorted(groups):
        table.add_row(f"{g}: train loss (last round it ran)", f"{groups[g][-1]:.4f}")
    dp = [r for r in records if isinstance(r.get("epsilon"), int | float)]
    if dp:
        table.add_row("client-level DP (epsilon, delta)", f"({dp[-1]['epsilon']:.3f}, {dp[-1]['delta']:g}) after "
                      f"{len(dp)} rounds, noise multiplier {dp[-1]['noise_multiplier']:.4g}")
    clipped = [r for r in records if isinstance(r.get("clip_norm"), int | float)]
    if clipped:
        n = sum(1 for r in clipped for c in r["clip"].values() if c["clipped"])
        total = sum(len(r["clip"]) for r in clipped)
        table.add_row("contributions clipped", f"{n} of {total} (bound {clipped[-1]['clip_norm']:.4g} last round)")
    for k, v in info.items():
        if k != "run_dir":
            table.add_row(k, str(v))
    console = Console(record=True, width=100)
    with console.capture() as cap:
        console.print(table)
    return cap.get()


def export_run(fed: Any, seconds: float) -> Any:
    """Write a finished run's global adapter (PEFT format; the merged model with ``export.merged``),
    its plots and summary.txt; returns its :class:`~flexlora.engines.rounds.RunResult`."""
    import resource

    from flexlora.core.distributions import type_counts
    from flexlora.engines.rounds import RunResult
    from flexlora.training.export import save_merged_model, save_peft_adapter

    factors = fed.global_factors()
    save_peft_adapter(fed.model, factors, fed.cfg.lora.alpha, fed.run_dir / "adapter",
                      base_model_name_or_path=fed.cfg.model, rslora=fed.cfg.lora.rslora)
    if fed.cfg.export.merged:
        save_merged_model(fed.model, fed.tokenizer, factors, fed.cfg.lora.alpha, fed.run_dir / "merged",
                          rslora=fed.cfg.lora.rslora)
    plot_curves(fed.records, fed.run_dir / "plots")
    counts = type_counts([fed.types[t] for t in fed.client_type])
    info = {
        "run_dir": str(fed.run_dir),
        "model": fed.cfg.model,
        "aggregator": fed.cfg.aggregator,
        "clients (per type)": ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
        "rounds": fed.cfg.rounds,
        "time (this process)": f"{seconds:.0f}s",
        "peak memory": f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
        "adapter": str(fed.run_dir / "adapter"),
    }
    summary = summary_table(fed.records, info)
    atomic_write_text(fed.run_dir / "summary.txt", summary)
    return RunResult(fed.run_dir, fed.records, summary)
