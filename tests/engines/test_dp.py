"""Client-level differential privacy in runs ([privacy] noise_multiplier / target_epsilon): the
epsilon of every round is dp-accounting's for the mechanism the run uses, a reproducible DP run
repeats and resumes exactly (on the Flower engine too), a secret one does not repeat, and bad
settings are named errors."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting as dpa
import pytest
import torch
from engine_common import TINY

from flexlora.engines.config import ConfigError, load_config
from flexlora.engines.federation import deterministic_view
from flexlora.engines.flower.client_app import app as client_app
from flexlora.engines.flower.inprocess import InProcessGrid
from flexlora.engines.flower.server_app import run_server
from flexlora.engines.simulation import Simulation

QUIET = ["eval.every=0", "eval.baseline=false", "eval.per_type=false"]
DP = ["privacy.clip_norm=0.5", "privacy.noise_multiplier=1.1", "privacy.delta=1e-3"]


def _run(tmp_path: Path, name: str, extra: list[str], resume: bool = False) -> Simulation:
    sim = Simulation(load_config(None, [*TINY, *QUIET, *extra]), tmp_path / name, resume=resume, progress=False,
                     log=lambda m: None)
    sim.run()
    return sim


def _records(d: Path) -> list[dict]:
    return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]


def _library_epsilon(z: float, sampled: int, population: int, rounds: int, delta: float) -> float:
    # Built here from the library directly: m of N without replacement (replace-one relation),
    # Gaussian noise z C on a sum whose replace-one sensitivity is 2 C.
    acc = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    event = dpa.SampledWithoutReplacementDpEvent(population, sampled, dpa.GaussianDpEvent(z / 2))
    acc.compose(dpa.SelfComposedDpEvent(event, rounds))
    return acc.get_epsilon(delta)


def test_each_round_reports_the_accountants_epsilon(tmp_path: Path) -> None:
    sim = _run(tmp_path, "a", [*DP, "rounds=3", "privacy.reproducible=true"])
    recs = [r for r in _records(sim.run_dir) if r["round"] > 0]
    # TINY: 4 clients, 3 sampled per round.
    want = [_library_epsilon(1.1, 3, 4, t, 1e-3) for t in (1, 2, 3)]
    assert [r["epsilon"] for r in recs] == pytest.approx(want, rel=1e-9)
    assert want[0] < want[1] < want[2]
    assert all(r["noise_multiplier"] == 1.1 and r["delta"] == 1e-3 for r in recs)
    assert "client-level DP (epsilon, delta)" in (sim.run_dir / "summary.txt").read_text()


def test_noise_changes_the_model_and_only_a_reproducible_run_repeats(tmp_path: Path) -> None:
    clipped = _run(tmp_path, "clip", ["privacy.clip_norm=0.5", "rounds=1"])
    r1 = _run(tmp_path, "r1", [*DP, "rounds=1", "privacy.reproducible=true"])
    r2 = _run(tmp_path, "r2", [*DP, "rounds=1", "privacy.reproducible=true"])
    s1 = _run(tmp_path, "s1", [*DP, "rounds=1"])
    s2 = _run(tmp_path, "s2", [*DP, "rounds=1"])
    m = next(iter(clipped.shapes))
    dense = {k: s.method.state.dense(m) for k, s in (("clip", clipped), ("r1", r1), ("r2", r2), ("s1", s1),
                                                       ("s2", s2))}
    assert torch.equal(dense["r1"], dense["r2"])
    assert not torch.equal(dense["s1"], dense["s2"])  # the noise (and sampling) come from secret randomness
    assert not torch.equal(dense["clip"], dense["r1"])
    # The noise on this module: std z C / m per entry of the dense sum, before the SVD keeps
    # max_rank directions; its energy is far above the clipped signal's difference of zero.
    assert float((dense["r1"] - dense["clip"]).norm()) > 0


def test_target_epsilon_picks_the_noise_for_the_planned_rounds(tmp_path: Path) -> None:
    sim = _run(tmp_path, "t", ["privacy.clip_norm=0.5", "privacy.target_epsilon=4.0", "privacy.delta=1e-3", "rounds=2",
                               "privacy.reproducible=true"])
    last = _records(sim.run_dir)[-1]
    assert last["epsilon"] <= 4.0 * (1 + 1e-6) and last["epsilon"] == pytest.approx(4.0, rel=1e-2)
    assert last["epsilon"] == pytest.approx(_library_epsilon(last["noise_multiplier"], 3, 4, 2, 1e-3), rel=1e-9)


def test_a_reproducible_dp_run_resumes_exactly_and_matches_flower(tmp_path: Path) -> None:
    sets = [*DP, "privacy.reproducible=true", "privacy.adaptive_quantile=0.5"]
    full = _run(tmp_path, "full", [*sets, "rounds=3"])
    _run(tmp_path, "split", [*sets, "rounds=2"])
    again = _run(tmp_path, "split", [*sets, "rounds=3"], resume=True)
    # The first leg evaluated its last round (round 2) as a final round; the rest is identical.
    evals = ("eval_loss", "rougeL", "rougeL_per_task", "eval_examples")
    assert [{k: v for k, v in r.items() if k not in evals or r["round"] == 3}
            for r in deterministic_view(_records(again.run_dir))] == deterministic_view(_records(full.run_dir))
    for m in full.shapes:
        assert torch.equal(full.method.state.dense(m), again.method.state.dense(m))
    grid = InProcessGrid(client_app, [{"partition-id": i} for i in range(4)])
    res = run_server(grid, {"set": ";".join([*TINY, *QUIET, *sets, "rounds=3"]), "output": str(tmp_path / "fl")},
                     log=lambda m: None)
    assert deterministic_view(_records(res.run_dir)) == deterministic_view(_records(full.run_dir))


@pytest.mark.parametrize("sets,match", [
    (["privacy.noise_multiplier=-1", "privacy.clip_norm=1"], "privacy.noise_multiplier"),
    (["privacy.noise_multiplier=1"], "privacy.clip_norm > 0"),
    (["privacy.noise_multiplier=1", "privacy.clip_norm=1", "privacy.delta=0"], "privacy.delta"),
    (["privacy.noise_multiplier=1", "privacy.clip_norm=1", "privacy.delta=1"], "privacy.delta"),
    (["privacy.noise_multiplier=1", "privacy.clip_norm=1", "privacy.target_epsilon=2"], "give one of them"),
    (["privacy.noise_multiplier=1", "privacy.clip_norm=1", "aggregator=hetlora"], "norms of the clients' updates"),
    (["privacy.noise_multiplier=1", "privacy.clip_norm=1", "flexlora.remedy=rank-partitioned"], "rank band"),
    (["privacy.noise_multiplier=1", "privacy.clip_norm=1", "aggregator=slora"], "stage-1 sparse"),
])
def test_bad_dp_settings_are_named(sets: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*TINY, *sets])


def test_an_unreachable_target_is_named(tmp_path: Path) -> None:
    # 3 of 4 clients per round, an adaptive bound whose count carries little noise: the count
    # alone spends more than epsilon 0.5.
    with pytest.raises(ConfigError, match="noisy count alone"):
        _run(tmp_path, "x", ["privacy.clip_norm=0.5", "privacy.adaptive_quantile=0.5", "privacy.count_noise=0.1",
                             "privacy.target_epsilon=0.5", "rounds=2"])


def test_a_target_met_by_any_noise_is_named() -> None:
    from flexlora.methods.privacy import noise_for_epsilon

    with pytest.raises(ConfigError, match="met by any noise multiplier"):
        noise_for_epsilon(1e9, 1e-3, 1, 3, 4)
