"""SLoRA in the engine: stage 1 trains sparse changes on the masks, stage 2 starts every client
from the best approximation of the stage-1 change at its own ranks, and resume is bit-exact
across the stage boundary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_common import TINY
from safetensors.torch import load_file

from flexlora.core.aggregators import AggregationError
from flexlora.core.sparse import dense_change
from flexlora.core.types import lora_scaling
from flexlora.engines.checkpoint import load_checkpoint
from flexlora.engines.config import load_config
from flexlora.engines.federation import deterministic_view
from flexlora.engines.simulation import Simulation
from flexlora.methods import unpack_factors

QUIET = ["eval.every=0", "eval.baseline=false", "eval.per_type=false"]


def _sim(tmp_path: Path, name: str, *extra: str, resume: bool = False) -> Simulation:
    return Simulation(load_config(None, [*TINY, "aggregator=slora", *QUIET, *extra]), tmp_path / name,
                      resume=resume, progress=False, log=lambda m: None)


def test_stage2_starts_at_w0_plus_the_rank_r_approximation_of_the_stage1_change(tmp_path: Path) -> None:
    sim = _sim(tmp_path, "a", "slora.then=flexlora", "slora.stage1_rounds=1", "rounds=1")
    w0 = {m: dict(sim.model.named_modules())[m].weight.detach().clone() for m in sim.shapes}
    sim.run()
    # Stage 1 left the shared base model untouched and produced a nonzero change on the masks.
    assert all(torch.equal(dict(sim.model.named_modules())[m].weight, w0[m]) for m in sim.shapes)
    ckpt = load_checkpoint(sim.run_dir / "checkpoints")
    change = ckpt["slora_change"]
    assert change is not None and any(float(v.abs().max()) > 0 for v in change.values())
    rec = [json.loads(x) for x in (sim.run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["slora_stage"] == 1
    # Upload = 4 bytes per masked entry of the client's type (its LoRA share of each module).
    for cid, b in rec["bytes"].items():
        k = int(cid.removeprefix("client"))
        assert b["up"] == 4 * sum(sim.method.counts(k).values())
    # The round-2 tasks: every client starts from T_r(change) at its own ranks (Eckart-Young).
    again = _sim(tmp_path, "a", "slora.then=flexlora", "slora.stage1_rounds=1", "rounds=2", resume=True)
    tasks = again.plan_round(2)
    assert len({t.spec.type_name for t in tasks}) > 1
    for t in tasks:
        init = unpack_factors(t.tensors, "init/")
        assert t.meta.get("stage") != 1 and init
        for m, shape in sim.shapes.items():
            r = t.spec.ranks[m]
            d = dense_change(m, shape, change[m], sim.cfg.seed).double()
            U, S, Vh = torch.linalg.svd(d)
            best = (U[:, :r] * S[:r]) @ Vh[:r]
            a, b = init[m]
            got = lora_scaling(t.spec.alpha, r) * (b.double() @ a.double())
            assert torch.allclose(got, best, atol=1e-6 * max(1.0, float(best.abs().max()))), (t.spec.client_id, m)


@pytest.mark.parametrize("then,extra", [("flexlora", []), ("fedit", ["rank_distribution=homo"])])
def test_resume_is_bit_exact_inside_stage1_and_at_the_boundary(tmp_path: Path, then: str, extra: list[str]) -> None:
    sets = [f"slora.then={then}", "slora.stage1_rounds=2", *extra]
    full = _sim(tmp_path, "full", *sets, "rounds=3")
    full.run()
    recs = [json.loads(x) for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["slora_stage"] for r in recs] == [1, 1, 2]
    want = load_file(str(full.run_dir / "adapter" / "adapter_model.safetensors"))
    for cut in (1, 2):
        _sim(tmp_path, f"cut{cut}", *sets, f"rounds={cut}").run()
        res = _sim(tmp_path, f"cut{cut}", *sets, "rounds=3", resume=True)
        res.run()
        got = load_file(str(res.run_dir / "adapter" / "adapter_model.safetensors"))
        assert all(torch.equal(want[k], got[k]) for k in want), cut
        r2 = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["train_loss"] for r in deterministic_view(r2)] == [r["train_loss"] for r in recs]


def test_fedit_stage2_with_mixed_ranks_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(AggregationError, match="rank_distribution=homo"):
        _sim(tmp_path, "x", "slora.then=fedit", "rank_distribution=uniform")
