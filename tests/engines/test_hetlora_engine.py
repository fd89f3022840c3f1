"""Faithful HetLoRA in the engine: clients self-prune their ranks, train at the pruned ranks in
their next rounds, never go below the floor, and a resumed run keeps the pruned ranks."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from engine_common import run_local, run_metrics
from safetensors.torch import load_file

from flexlora.engines.federation import deterministic_view
from flexlora.engines.simulation import Simulation

QUIET = ["eval.every=0", "eval.baseline=false", "eval.per_type=false"]
# threshold 1: the tail's share is always below 1, so every module of every participating
# client prunes each round, which makes the expected ranks a pure function of participation.
PRUNE = ["aggregator=hetlora", "hetlora.prune_threshold=1.0", "clients_per_round=2", *QUIET]


def _run(tmp_path: Path, name: str, *extra: str, resume: bool = False) -> Simulation:
    return run_local(tmp_path, name, [*PRUNE, *extra], resume=resume)


_metrics = run_metrics


def _expected_ranks(sim: Simulation, records: list[dict]) -> list[dict[str, dict[str, int]]]:
    """Replays HetLoRA's rule on the participation history: a client that trained keeps
    floor(0.99 r) ranks (at least 1 below r), never fewer than the smallest type's rank."""
    groups = sorted(set(sim.groups.values()))
    types = {k: sim.types[sim.client_type[k]] for k in range(sim.num_clients)}
    rank = {k: {"attention": t.attention_rank, "mlp": t.mlp_rank} for k, t in types.items()}
    floor = {g: min(r[g] for r in rank.values()) for g in groups}
    out = []
    for rec in records:
        sampled = [int(c.removeprefix("client")) for c in rec["clients"]]
        out.append({f"client{k:05d}": {g: rank[k][g] for g in groups} for k in sampled})
        for k in sampled:
            for g in groups:
                r = rank[k][g]
                rank[k][g] = max(min(r, max(floor[g], max(1, math.floor(0.99 * r)))), min(floor[g], r))
    return out


def test_clients_prune_by_the_rule_train_at_the_pruned_ranks_and_resume_exactly(tmp_path: Path) -> None:
    full = _run(tmp_path, "full", "rounds=4")
    recs = _metrics(full)
    want = _expected_ranks(full, recs)
    assert [r["ranks"] for r in recs] == want
    # Not vacuous: pruning happened, and a client trained at smaller ranks in a later round.
    assert any(rec.get("pruned") for rec in recs)
    assert any(want[i][c] != want[j][c] for i in range(len(want)) for j in range(i) for c in want[i] if c in want[j])
    # The uploads have exactly the pruned ranks' size: the clients really trained at them.
    for rec in recs:
        for cid, b in rec["bytes"].items():
            k = int(cid.removeprefix("client"))
            ranks = {m: rec["ranks"][cid][full.groups[m]] for m in full.shapes}
            assert b["up"] == sum(4 * ranks[m] * sum(full.shapes[m]) for m in full.shapes), (rec["round"], k)

    # Stop after round 2, then resume to 4: the pruned ranks come back from the checkpoint.
    _run(tmp_path, "cut", "rounds=2")
    resumed = _run(tmp_path, "cut", "rounds=4", resume=True)
    # (The cut run evaluated its last round 2; the uninterrupted one did not.)
    no_eval = lambda rs: [{k: v for k, v in r.items() if not k.startswith(("rougeL", "eval_"))}  # noqa: E731
                          for r in deterministic_view(rs)]
    assert no_eval(_metrics(resumed)) == no_eval(recs)
    a = load_file(str(full.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed.run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_without_pruning_every_client_keeps_its_type_ranks(tmp_path: Path) -> None:
    sim = _run(tmp_path, "keep", "rounds=3", "hetlora.prune=false")
    for rec in _metrics(sim):
        assert "pruned" not in rec
        for cid, got in rec["ranks"].items():
            t = sim.types[sim.client_type[int(cid.removeprefix("client"))]]
            assert got == {"attention": t.attention_rank, "mlp": t.mlp_rank}


def test_the_floor_is_never_crossed(tmp_path: Path) -> None:
    sim = _run(tmp_path, "floor", "rounds=4", "clients_per_round=4", "hetlora.min_rank=3")
    recs = _metrics(sim)
    assert any(rec.get("pruned") for rec in recs)
    for rec in recs:
        for cid, got in rec["ranks"].items():
            t = sim.types[sim.client_type[int(cid.removeprefix("client"))]]
            for g, r0 in (("attention", t.attention_rank), ("mlp", t.mlp_rank)):
                assert got[g] >= min(3, r0), (rec["round"], cid, got)
