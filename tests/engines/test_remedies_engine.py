"""FlexLoRA's rank-collapse remedies in the engine: set through the ``[flexlora]`` section, a run
resumes bit for bit (the server memory lives in the checkpointed global state), the remedies
change the run's global update, and a remedy for an aggregator that has none is refused at set-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_common import TINY, run_local, run_metrics
from safetensors.torch import load_file

from flexlora.engines.config import ConfigError, load_config
from flexlora.engines.federation import deterministic_view
from flexlora.engines.simulation import Simulation

QUIET = ["eval.every=0", "eval.baseline=false", "eval.per_type=false", "aggregator=flexlora"]


def _run(tmp_path: Path, name: str, *extra: str, resume: bool = False) -> Simulation:
    return run_local(tmp_path, name, [*QUIET, *extra], resume=resume)


_metrics = run_metrics


@pytest.mark.parametrize("remedy", ["server-memory", "rank-partitioned"])
def test_remedy_runs_changes_the_global_update_and_resumes_exactly(tmp_path: Path, remedy: str) -> None:
    opt = f"flexlora.remedy={json.dumps(remedy)}"
    full = _run(tmp_path, "full", opt, "rounds=3")
    assert full.method.aggregator.remedy == remedy
    if remedy == "server-memory":  # the remedy whose state carries over rounds
        _check_resume(tmp_path, full, opt)
    # The same run without the remedy ends with another global update (mixed ranks every round).
    faithful = _run(tmp_path, "faithful", "rounds=3")
    rec_r, rec_f = _metrics(full)[-1], _metrics(faithful)[-1]
    assert rec_r["spectrum"]["top"] != rec_f["spectrum"]["top"]
    assert all(0.0 <= r["tail_energy"] <= 1.0 for r in _metrics(full))


def _check_resume(tmp_path: Path, full: Simulation, opt: str) -> None:
    _run(tmp_path, "cut", opt, "rounds=2")
    resumed = _run(tmp_path, "cut", opt, "rounds=3", resume=True)
    # (The cut run evaluated its last round 2; the uninterrupted one did not.)
    no_eval = lambda rs: [{k: v for k, v in r.items() if not k.startswith(("rougeL", "eval_"))}  # noqa: E731
                          for r in deterministic_view(rs)]
    assert no_eval(_metrics(resumed)) == no_eval(_metrics(full))
    a = load_file(str(full.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed.run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_remedy_for_another_aggregator_is_refused_at_set_up(tmp_path: Path) -> None:
    sets = [*TINY, *QUIET, "aggregator=hetlora", 'aggregator_options.remedy="server-memory"']
    # From a config: refused while the config loads, before any model or run directory.
    with pytest.raises(ConfigError, match="unknown config key 'hetlora.remedy'; its settings are weighting"):
        load_config(None, sets)
    # In code the settings are typed: HetLoRA's dataclass has no field for a remedy at all.
    from flexlora.methods import HetLoRA

    with pytest.raises(TypeError, match="remedy"):
        HetLoRA.Options(remedy="server-memory")
    # And another method's options set on a built config are refused by the engine's set-up.
    from flexlora.methods import FlexLoRA

    cfg = load_config(None, sets[:-1])
    cfg.method_options["hetlora"] = FlexLoRA.Options(remedy="server-memory")
    with pytest.raises(ConfigError, match="config key 'hetlora': must be a HetLoRAOptions, got FlexLoRAOptions"):
        Simulation(cfg, tmp_path / "bad", progress=False, log=lambda m: None)
    assert not (tmp_path / "bad").exists()
