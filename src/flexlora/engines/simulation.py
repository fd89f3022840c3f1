"""The in-process engine: one process, one shared base model, clients trained in turn.

It only moves messages: each round it hands every :class:`~flexlora.training.client.ClientTask`
of the shared :class:`~flexlora.engines.federation.Federation` to
:func:`~flexlora.training.client.run_client_task` and returns the outcomes. Everything else
(sampling, distribution, aggregation, evaluation, checkpoints, outputs) is the federation's.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any

from flexlora.engines.federation import (
    ClientOutcome,
    Federation,
    FederationError,
    RunResult,
    client_types_for,
    default_run_dir,
    deterministic_view,
    resolve_device,
    sample_round_clients,
)
from flexlora.training.client import ClientTask, run_client_task, task_bytes, update_bytes

__all__ = ["ClientOutcome", "Federation", "FederationError", "LocalEngine", "RunResult", "Simulation",
           "client_types_for", "default_run_dir", "deterministic_view", "resolve_device", "sample_round_clients"]


class LocalEngine:
    """Trains each task's client on the federation's own base model, one after another.

    ``FLEXLORA_KILL_AT="R:C"`` (for the resume tests) sends SIGKILL to this process right after the
    C-th client of round R has trained, mid-round, before the round's checkpoint.
    """

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress
        kill = os.environ.get("FLEXLORA_KILL_AT")
        self._kill_at = tuple(int(x) for x in kill.split(":")) if kill else None

    def train_round(self, fed: Federation, rnd: int, tasks: Sequence[ClientTask]) -> Iterator[ClientOutcome]:
        """Train the tasks' clients in order, yielding each outcome as soon as it is trained."""
        from tqdm.auto import tqdm

        steps = sum(fed.train_cfg.num_steps(len(fed.partition.clients[t.client])) for t in tasks)
        done = 0
        with tqdm(total=steps, desc=f"round {rnd}/{fed.cfg.rounds}", unit="step", disable=not self.progress,
                  leave=False, position=1) as bar:
            for task in tasks:
                bar.set_postfix_str(f"round {rnd} {task.spec.client_id} ({task.spec.type_name})")

                def on_step(step: int, loss: float) -> None:
                    bar.update(1)

                update, result = run_client_task(fed.model, fed.tokenizer, task, fed.client_examples(task.client),
                                                 fed.train_cfg, encoding=fed.encoding, dropout=fed.cfg.lora.dropout,
                                                 on_step=on_step)
                outcome = ClientOutcome(task, update, train_loss=result.mean_loss, steps=result.steps,
                                        bytes_up=update_bytes(update), bytes_down=task_bytes(task))
                del update
                done += 1
                if self._kill_at == (rnd, done):
                    os.kill(os.getpid(), signal.SIGKILL)
                yield outcome


class Simulation(Federation):
    """A federation driven by the in-process engine (``flexlora run --engine local``).

    Takes the parameters of :class:`~flexlora.engines.federation.Federation`.
    """

    def run(self, engine: Any = None) -> RunResult:  # type: ignore[override]
        """Run (or continue) to ``cfg.rounds`` rounds in this process."""
        return super().run(engine if engine is not None else LocalEngine(self.progress))
