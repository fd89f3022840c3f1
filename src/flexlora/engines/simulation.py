"""The in-process engine: one process, one shared base model, clients trained in turn.

It only moves messages: each round it hands every :class:`~flexlora.training.client.ClientTask`
of the shared :class:`~flexlora.engines.federation.Federation` to the method's ``client_train``
and yields the outcomes. Everything else (sampling, distribution, aggregation, evaluation,
checkpoints, outputs) is the federation's and the method's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from flexlora.engines import faults
from flexlora.engines.federation import Federation, default_run_dir
from flexlora.engines.rounds import ClientOutcome, FederationError, RunResult, deterministic_view
from flexlora.engines.run_setup import client_types_for, resolve_device, sample_round_clients
from flexlora.methods import tensor_bytes
from flexlora.training.client import ClientTask

__all__ = ["ClientOutcome", "Federation", "FederationError", "LocalEngine", "RunResult", "Simulation",
           "client_types_for", "default_run_dir", "deterministic_view", "resolve_device", "sample_round_clients"]


class LocalEngine:
    """Trains each task's client on the federation's own base model, one after another."""

    def __init__(self, progress: bool = True) -> None:
        self.progress = progress

    def train_round(self, fed: Federation, rnd: int, tasks: Sequence[ClientTask]) -> Iterator[ClientOutcome]:
        """Train the tasks' clients in order, yielding each outcome as soon as it is trained."""
        from tqdm.auto import tqdm

        steps = sum(fed.train_cfg.num_steps(len(fed.partition.clients[t.client])) for t in tasks)
        with tqdm(total=steps, desc=f"round {rnd}/{fed.cfg.rounds}", unit="step", disable=not self.progress,
                  leave=False, position=1) as bar:
            for done, task in enumerate(tasks, 1):
                bar.set_postfix_str(f"round {rnd} {task.spec.client_id} ({task.spec.type_name})")

                def on_step(step: int, loss: float) -> None:
                    bar.update(1)

                reply = fed.train_client(task, on_step)
                reply = faults.fire("local.after_train", task=task, reply=reply) or reply
                outcome = ClientOutcome(task, reply, bytes_up=tensor_bytes(reply.tensors),
                                        bytes_down=tensor_bytes(task.tensors))
                del reply
                faults.fire("local.client_done", rnd=rnd, done=done)
                yield outcome


class Simulation(Federation):
    """A federation driven by the in-process engine (``flexlora run --engine local``).

    Takes the parameters of :class:`~flexlora.engines.federation.Federation`.
    """

    def run(self, engine: Any = None) -> RunResult:  # type: ignore[override]
        """Run (or continue) to ``cfg.rounds`` rounds in this process."""
        return super().run(engine if engine is not None else LocalEngine(self.progress))
