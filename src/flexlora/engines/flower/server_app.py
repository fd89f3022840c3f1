"""The FlexLoRA ServerApp: ``flwr run .`` starts it on the SuperLink's side.

Its run config (``[tool.flwr.app.config]`` in pyproject.toml, overridden with
``flwr run . <connection> --run-config "..."``) has four keys:

- ``config``: path of a flexlora TOML/YAML config ("" = the built-in defaults);
- ``set``: ``--set`` overrides separated by ``;`` (e.g. ``"rounds=2;model='builtin:tiny-llama'"``);
- ``output``: the run directory (use an absolute path: the ServerApp's working directory is Flower's);
- ``resume``: continue the run in ``output`` from its checkpoint, with the run's own config.toml.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log as flwr_log
from flwr.serverapp import Grid, ServerApp

from flexlora.engines.config import ConfigError, RunConfig, load_config
from flexlora.engines.federation import Federation, default_run_dir
from flexlora.engines.flower.strategy import FlexLoRAStrategy
from flexlora.engines.rounds import RunResult

app = ServerApp()


def _log(msg: str) -> None:
    flwr_log(logging.WARNING if msg.startswith("warning") else logging.INFO, msg)


def split_overrides(text: str) -> list[str]:
    """``"a=1;b.c=2"`` -> ``["a=1", "b.c=2"]`` (blank entries ignored)."""
    return [s.strip() for s in str(text).split(";") if s.strip()]


def resolve_run(run_config: dict[str, Any]) -> tuple[RunConfig, Path, bool]:
    """The flexlora config, run directory and resume flag named by a Flower run config."""
    known = {"config", "set", "output", "resume"}
    unknown = sorted(set(run_config) - known)
    if unknown:
        raise ConfigError(f"unknown Flower run-config keys {unknown}; the FlexLoRA app takes {sorted(known)}")
    output = Path(str(run_config.get("output") or default_run_dir())).expanduser().resolve()
    resume = run_config.get("resume", False)
    if isinstance(resume, str):
        resume = resume.strip().lower() in ("1", "true", "yes")
    overrides = split_overrides(str(run_config.get("set", "")))
    if resume:
        if not (output / "config.toml").is_file():
            raise ConfigError(f"resume=true but {output} holds no config.toml; is it a flexlora run directory?")
        return load_config(output / "config.toml", overrides), output, True
    path = str(run_config.get("config") or "").strip()
    cfg_path = Path(path).expanduser().resolve() if path else None
    if cfg_path is not None and not cfg_path.is_file():
        raise ConfigError(f"run-config 'config' names {cfg_path}, which does not exist (the ServerApp runs in "
                          f"{Path.cwd()}; pass an absolute path)")
    return load_config(cfg_path, overrides), output, False


def run_server(grid: Grid, run_config: dict[str, Any], *, log=_log) -> RunResult:
    """Build the federation from ``run_config`` and run it over ``grid`` (what the ServerApp does)."""
    cfg, output, resume = resolve_run(run_config)
    fed = Federation(cfg, output, resume=resume, progress=False, log=log)
    result = FlexLoRAStrategy(fed, log=log).start(grid)
    log(f"run finished; outputs in {result.run_dir}\n{result.summary}")
    return result


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, dict(context.run_config))
