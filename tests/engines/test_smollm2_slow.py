"""A real federated run on SmolLM2-135M-Instruct (slow; `make test-slow`). CI leaves it out
(marker ``long``): `make demo` there runs SmolLM2 end to end and checks its Rouge-L."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.long]


def test_two_rounds_three_clients_on_smollm2(tmp_path: Path) -> None:
    from peft import PeftModel

    from flexlora.engines.config import load_config
    from flexlora.engines.simulation import Simulation
    from flexlora.training.adapter import client_adapter
    from flexlora.training.models import load_base_model

    cfg = load_config(None, [
        "rounds=2", "clients_per_round=3", "local_steps=4", "train.lr=1e-3",
        # Small enough for CI: the evaluation (base, final, and once per client type) dominates.
        "eval.max_tasks=2", "eval.max_examples_per_task=3", "eval.max_new_tokens=8",
    ])
    assert cfg.model == "builtin:smollm2-135m-instruct" and cfg.data == "builtin:demo-tasks"
    sim = Simulation(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    sim.run()
    records = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert all(len(r["clients"]) == 3 for r in records[1:])
    # Learning the answer format of the trained tasks lowers the loss on the unseen ones.
    assert records[2]["eval_loss"] < records[0]["eval_loss"]
    # eval.every = 2: the base model (round 0) and the final round are evaluated.
    assert ["rougeL" in r for r in records] == [True, False, True]
    assert all(0.0 <= r["rougeL"] <= 1.0 for r in records if "rougeL" in r)
    assert set(records[2]["rougeL_by_type"]) == {t.name for t in sim.types}

    # The exported adapter loads in stock PEFT and is the engine's global model.
    ids = torch.tensor([sim.eval_items[0][1]])
    factors = sim.global_factors()
    with client_adapter(sim.model, {m: a.shape[0] for m, (a, _) in factors.items()}, cfg.lora.alpha, factors) as m:
        want = m(input_ids=ids).logits
    base, _ = load_base_model(cfg.model)
    got = PeftModel.from_pretrained(base, str(sim.run_dir / "adapter"))(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)
