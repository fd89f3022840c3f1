"""The grid's rows and presets, and the errors of ``flexlora bench quality`` for bad requests."""

from __future__ import annotations

from pathlib import Path

import pytest

from flexlora.bench.grid import DATASETS, BenchError, grid_rows
from flexlora.bench.quality import plan_quality
from flexlora.cli.main import main
from flexlora.core.distributions import available_distributions
from flexlora.data.loaders import DOLLY_CATEGORIES

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def test_smoke_rows():
    rows = grid_rows("smoke")
    ids = [r.id for r in rows]
    assert ids[0] == "demo/base" and len(ids) == len(set(ids))
    assert {r.method for r in rows} >= {"FedAvg", "FedIT", "FlexLoRA+FedAvg", "FlexLoRA+FedIT", "HetLoRA", "FLoRA",
                                        "FedIT rich", "base"}
    # Every method once: the combinations only under uniform.
    assert all(r.seed == 0 for r in rows)
    assert {r.distribution for r in rows if not r.is_base} == {"homo", "uniform"}
    fedavg = next(r for r in rows if r.id == "demo/FedAvg/homo/s0")
    assert fedavg.sets == ("aggregator=fedavg", "train.optimizer=sgd", "train.lr=0.05", "rank_distribution=homo",
                           "seed=0")
    assert fedavg.dirname == "demo__FedAvg__homo__s0"
    assert next(r for r in rows if r.method == "FedIT rich").id == "demo/FedIT-rich/homo/s0"


def test_quick_rows_and_seeds():
    rows = grid_rows("quick")
    assert {r.dataset for r in rows} == {"ni"}
    dists = set(available_distributions())
    assert all(r.distribution in dists for r in rows if not r.is_base)
    seeds = {}
    for r in rows:
        seeds.setdefault((r.method, r.distribution), []).append(r.seed)
    for key in (("FedIT", "homo"), ("FlexLoRA+FedIT", "uniform"), ("FlexLoRA+FedIT", "heavy-tail-light"),
                ("FlexLoRA+FedIT server-memory", "heavy-tail-light"),
                ("FlexLoRA+FedIT rank-partitioned", "heavy-tail-light")):
        assert seeds[key] == [0, 1, 2]
    assert seeds[("FlexLoRA+FedIT server-memory", "uniform")] == [0]
    # 26 method/distribution pairs (3 homo, 4 x 3 combinations, 2 x 4 for HetLoRA, FLoRA, rsLoRA and the
    # two remedies, FedIT rich), 5 of them with three seeds, the base row, and the bounded and the two
    # DP rows under uniform: 21 + 15 + 1 + 3.
    assert len(rows) == 21 + 5 * 3 + 1 + 3
    assert {m for (m, d) in seeds if "clipped" in m or "DP" in m} == {
        "FlexLoRA+FedIT clipped", "FlexLoRA+FedIT DP eps=2", "FlexLoRA+FedIT DP eps=8"}
    assert seeds[("FlexLoRA+FedIT", "normal")] == [0]
    assert {d for (m, d) in seeds if m == "FlexLoRA+FedAvg"} == {"uniform", "heavy-tail-light",
                                                                  "heavy-tail-strong", "normal"}
    assert {d for (m, d) in seeds if m in ("HetLoRA", "FLoRA")} == {"uniform", "heavy-tail-light"}
    rich = next(r for r in rows if r.method == "FedIT rich")
    assert "lora.types=[[200, 200]]" in rich.sets
    for remedy in ("server-memory", "rank-partitioned"):
        method = f"FlexLoRA+FedIT {remedy}"
        assert {d for (m, d) in seeds if m == method} == {"uniform", "heavy-tail-light"}
        row = next(r for r in rows if r.method == method)
        assert f'flexlora.remedy="{remedy}"' in row.sets and "aggregator=flexlora" in row.sets


def test_dolly_partition_names_loader_categories():
    sets = DATASETS["dolly"].sets("/x/dolly.jsonl")
    assert 'data="/x/dolly.jsonl"' in sets and "data_options.partition=dirichlet" in sets
    assert "num_clients=20" in sets and "data_options.dirichlet_alpha=0.5" in sets
    unseen = next(s for s in sets if s.startswith("data_options.unseen_tasks="))
    for cat in ("summarization", "closed_qa"):
        assert cat in unseen and cat in DOLLY_CATEGORIES


@pytest.mark.skipif(not (SHARED / "natural-instructions").is_dir() or not (SHARED / "dolly-15k").is_dir(),
                    reason="../shared/data (Natural Instructions, Dolly-15k) is absent")
@pytest.mark.parametrize("preset", ["quick", "paper"])
def test_every_row_of_the_real_presets_has_a_valid_config(preset):
    plans = plan_quality(preset, data=["ni", "dolly"], sets=["model=some-org/some-model"], log=lambda m: None)
    assert len(plans) == 2 * len(grid_rows(preset, ["ni"]))
    ni = next(p for p in plans if p.row.id == "ni/FedIT/homo/s0").cfg
    assert ni.data.endswith("natural-instructions") and ni.num_clients == 0 and ni.rank_distribution == "homo"
    dolly = next(p for p in plans if p.row.id == "dolly/FlexLoRA+FedIT/uniform/s0").cfg
    assert dolly.data.endswith(".jsonl") and dolly.data_options.partition == "dirichlet"
    assert dolly.data_options.unseen_tasks == ["summarization", "closed_qa"]
    if preset == "paper":
        assert ni.clients_per_round == 0.05 and ni.local_steps == 0 and ni.train.epochs == 1.0
        assert ni.train.micro_batch_size == 4 and ni.train.cutoff_len == 512 and ni.lora.types == []


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "unknown preset; choose one of smoke, quick, paper"),
    (["--preset", "smoke", "--data", "ni=/no/such/dir"], "/no/such/dir does not exist"),
    (["--preset", "smoke", "--data", "mnist"], "unknown data set 'mnist'"),
    # An existing data path (the default one, ../shared/data, may be absent on a fresh machine).
    (["--preset", "paper", "--data", "ni={tmp}"], "needs the model: add --set model="),
    (["--preset", "smoke", "--only", "no-such-row"], "matches no row of preset smoke"),
    (["--preset", "smoke", "--set", "train.lrr=1"], "unknown config key 'train.lrr'"),
])
def test_bad_requests_are_clear_errors(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    if any("{tmp}" in a for a in args):  # a directory with the Natural Instructions layout
        for sub in ("tasks", "splits"):
            (tmp_path / "ni" / sub).mkdir(parents=True)
    args = [a.replace("{tmp}", str(tmp_path / "ni")) for a in args]
    assert main(["bench", "quality", *args, "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing is written for a bad request


def test_list_prints_the_rows(capsys):
    assert main(["bench", "quality", "--preset", "smoke", "--list", "--only", "FedIT"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("demo/FedIT/homo/s0 aggregator=fedit")
    assert all("FedIT" in line.split()[0] for line in printed)


def test_rows_recorded_with_other_settings_are_refused_until_forced(tmp_path):
    from flexlora.bench.quality import read_results, run_quality

    out = tmp_path / "grid"
    res = run_quality("smoke", out, only=["demo/base"], log=lambda m: None)
    assert res.ran == ["demo/base"] and not res.failed
    again = run_quality("smoke", out, only=["demo/base"], log=lambda m: None)
    assert again.skipped == ["demo/base"] and again.ran == []
    with pytest.raises(BenchError, match="was run with other settings"):
        run_quality("smoke", out, only=["demo/base"], sets=["eval.max_new_tokens=3"], log=lambda m: None)
    forced = run_quality("smoke", out, only=["demo/base"], sets=["eval.max_new_tokens=3"], force=True,
                         log=lambda m: None)
    assert forced.ran == ["demo/base"]
    (row,) = read_results(out / "results.jsonl")
    assert "eval.max_new_tokens=3" in row["config_sets"] and (out / "results.md").is_file()
