"""Every fix an error message suggests can be applied: each config key it names (``--set KEY=``,
``config key 'KEY'``, ``section.key = value``) exists in the run config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from engine_common import TINY

from flexlora.data import DataError
from flexlora.engines.config import ConfigError, describe, load_config
from flexlora.engines.simulation import Simulation

_KEY = re.compile(r"^([a-z_]+(?:\.[a-z_]+)?) = ", re.M)
_NAMED = [re.compile(r"--set ([a-z_]+(?:\.[a-z_]+)?)="), re.compile(r"config keys? '([a-z_]+(?:\.[a-z_]+)?)'"),
          re.compile(r"\b([a-z_]+\.[a-z_]+) ?= ?[\w\"'\[]")]


def _known() -> set[str]:
    return set(_KEY.findall(describe()))


def _named(message: str) -> set[str]:
    return {k for pattern in _NAMED for k in pattern.findall(message)}


BAD_CONFIGS = [
    ["privacy.adaptive_quantile=0.5"],
    ["privacy.noise_multiplier=1"],
    ["privacy.clip_norm=1", "aggregator=slora"],
    ["privacy.noise_multiplier=1", "privacy.clip_norm=1", "aggregator=hetlora"],
    ["flexlora.max_rank=-1"],
    ["lora.init=per-client", "aggregator=fedit"],
    ["local_steps=0"],
    ["train.momentum=0.5"],
    ["lora.ranks=[4, 8]", "aggregator=fedit"],
    ["eval.every=-1"],
]


@pytest.mark.parametrize("sets", BAD_CONFIGS)
def test_config_errors_name_only_keys_that_exist(sets: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, [*TINY, *sets])
    named = _named(str(exc.value))
    assert named, f"the error names no key: {exc.value}"
    assert named <= _known(), (str(exc.value), named - _known())


def test_too_few_examples_suggests_keys_that_exist(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        Simulation(load_config(None, [*TINY, "num_clients=1600"]), tmp_path / "r", progress=False, log=lambda m: None)
    message = str(exc.value)
    assert "min_per_client" not in message  # not a config key: a run always asks for one example per client
    named = _named(message)
    assert {"num_clients", "data_options.max_per_task"} <= named <= _known(), (message, named)


def test_one_client_per_round_is_said_at_start_up(tmp_path: Path) -> None:
    logs: list[str] = []
    Simulation(load_config(None, [*TINY, "clients_per_round=0.2"]), tmp_path / "one", progress=False, log=logs.append)
    assert any("each round's global model is that one client's adapter" in m for m in logs), logs
    logs.clear()
    Simulation(load_config(None, TINY), tmp_path / "three", progress=False, log=logs.append)
    assert not any("one client's adapter" in m for m in logs)
