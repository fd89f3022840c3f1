"""Flower's Ray simulation gives the in-process engine's adapter and metrics (slow: Ray starts in ~20 s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_common import TINY
from safetensors.torch import load_file

from flexlora.engines.config import load_config
from flexlora.engines.federation import deterministic_view
from flexlora.engines.simulation import Simulation

pytestmark = pytest.mark.slow


def test_ray_simulation_matches_the_in_process_engine(tmp_path: Path) -> None:
    from flexlora.engines.flower.simulation import run_flower_simulation

    cfg = [*TINY, "rounds=2", "flower.client_cpus=1"]
    local = Simulation(load_config(None, cfg), tmp_path / "local", progress=False, log=lambda m: None)
    local.run()
    res = run_flower_simulation(load_config(None, cfg), tmp_path / "ray", log=lambda m: None)
    a = load_file(str(local.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(res.run_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert max(float(t.abs().max()) for t in a.values()) > 0
    ra = [json.loads(x) for x in (local.run_dir / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert deterministic_view(ra) == deterministic_view(rb)
    assert torch.isfinite(torch.tensor(rb[-1]["train_loss"]))
