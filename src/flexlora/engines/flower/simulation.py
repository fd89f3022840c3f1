"""Flower's Ray simulation of the FlexLoRA app (``flexlora run CONFIG --engine flower-sim``).

The ServerApp runs in this process; every virtual SuperNode runs the same ClientApp as a
deployment, in Ray worker processes, with ``partition-id`` set by Flower (so each node takes its
partition of the run's data and the rank the run's distribution drew for it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from flexlora.engines.config import RunConfig
from flexlora.engines.federation import Federation
from flexlora.engines.flower.client_app import app as client_app
from flexlora.engines.flower.strategy import FlexLoRAStrategy
from flexlora.engines.rounds import FederationError, RunResult

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def run_flower_simulation(cfg: RunConfig, run_dir: Path, *, resume: bool = False,
                          log: Callable[[str], None] = print) -> RunResult:
    """Run ``cfg`` on Flower's Ray simulation with ``cfg.flower.num_supernodes`` virtual nodes
    (default: one per client) and return the federation's result."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    fed = Federation(cfg, run_dir, resume=resume, progress=False, log=log)
    n = cfg.flower.num_supernodes or fed.num_clients
    results: list[RunResult] = []
    errors: list[BaseException] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            results.append(FlexLoRAStrategy(fed, log=log).start(grid))
        except BaseException as exc:  # re-raised below: Flower's runtime would only log it
            errors.append(exc)

    run_simulation(server_app=server, client_app=client_app, num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": cfg.flower.client_cpus, "num_gpus": 0.0}})
    if errors:
        raise errors[0]
    if not results:
        raise FederationError("the Flower simulation ended without finishing the run; see the log above")
    return results[0]
