"""The quality report from hand-written results rows, checked against statistics computed by hand."""

from __future__ import annotations

import math

import pytest

from flexlora.bench.grid import Row
from flexlora.bench.quality import bytes_summary, collect_result
from flexlora.bench.report import format_mean_std, mean_std, render_markdown, spread_verdict, write_report


def _row(method: str, dist: str, seed: int, final: float, **extra) -> dict:
    return {"id": f"ni/{method}/{dist}/s{seed}", "method": method, "distribution": dist, "dataset": "ni",
            "seed": seed, "sets": [], "preset": "quick", "rougeL": {"2": final / 2, "4": final},
            "rougeL_final": final, "rougeL_per_task": {"t": final},
            "bytes_up": {"mean": 1000.0, "per_type": {"type1": 1000.0}, "per_round": {}},
            "bytes_down": {"mean": 500.0, "per_type": {"type1": 500.0}, "per_round": {}},
            "aggregate_seconds": {"1": 0.5, "2": 1.5}, "wall_seconds": 300.0, **extra}


# Three seeds each. By hand (sample std, n - 1 = 2):
#   FedIT/homo            0.10 0.20 0.30 -> mean 0.2000, std sqrt((0.01 + 0 + 0.01) / 2) = 0.1000
#   FlexLoRA+FedIT/uniform 0.50 0.60 0.70 -> mean 0.6000, std 0.1000
#   FlexLoRA+FedIT/h-t-l  0.25 0.30 0.35 -> mean 0.3000, std sqrt((0.0025 + 0 + 0.0025) / 2) = 0.0500
# Pairs (a - b, std a + std b):
#   FedIT/homo - FlexLoRA+FedIT/uniform           = -0.4000, 0.2000 -> larger than the spread
#   FedIT/homo - FlexLoRA+FedIT/heavy-tail-light  = -0.1000, 0.1500 -> within the spread
#   uniform - heavy-tail-light                    = +0.3000, 0.1500 -> larger than the spread
ROWS = [
    *(_row("FedIT", "homo", s, v) for s, v in enumerate((0.10, 0.20, 0.30))),
    *(_row("FlexLoRA+FedIT", "uniform", s, v) for s, v in enumerate((0.50, 0.60, 0.70))),
    *(_row("FlexLoRA+FedIT", "heavy-tail-light", s, v) for s, v in enumerate((0.25, 0.30, 0.35))),
    _row("HetLoRA", "uniform", 0, 0.42, tail_energy={"1": 0.2, "2": 0.1}),
    {"id": "ni/base", "method": "base", "distribution": "-", "dataset": "ni", "seed": 0, "sets": [],
     "rougeL": {"0": 0.05}, "rougeL_final": 0.05, "rougeL_per_task": {"t": 0.05}, "eval_examples": 48},
]


def test_mean_std_by_hand():
    m, s, n = mean_std([0.1, 0.2, 0.3])
    assert n == 3 and m == pytest.approx(0.2) and s == pytest.approx(0.1)
    assert format_mean_std([0.1, 0.2, 0.3]) == "0.2000 ± 0.1000 (3)"
    assert format_mean_std([0.25, 0.30, 0.35]) == "0.3000 ± 0.0500 (3)"
    assert format_mean_std([0.42]) == "0.4200 (1)"
    assert format_mean_std([]) == "–"
    assert mean_std([0.3, math.nan])[2] == 1
    diff, spread, verdict = spread_verdict([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])
    assert diff == pytest.approx(-0.4) and spread == pytest.approx(0.2) and verdict == "larger than the spread"
    assert spread_verdict([0.1, 0.2, 0.3], [0.25, 0.30, 0.35])[2] == "within the spread"


def test_report_tables_and_verdicts():
    md = render_markdown(ROWS)
    lines = md.splitlines()
    assert "Base model (untuned): Rouge-L 0.0500 (48 answers)." in md
    header = "| method | homo | uniform | heavy-tail-light | heavy-tail-strong | normal |"
    assert header in lines
    assert "| base (untuned) | 0.0500 | | | | |" in lines
    assert "| FedIT | 0.2000 ± 0.1000 (3) |  |  |  |  |" in lines
    assert "| FlexLoRA+FedIT |  | 0.6000 ± 0.1000 (3) | 0.3000 ± 0.0500 (3) |  |  |" in lines
    assert "| HetLoRA |  | 0.4200 (1) |  |  |  |" in lines
    # Methods in the paper's order, base first.
    first = {m: next(i for i, ln in enumerate(lines) if ln.startswith(f"| {m} |"))
             for m in ("base (untuned)", "FedIT", "FlexLoRA+FedIT", "HetLoRA")}
    assert first["base (untuned)"] < first["FedIT"] < first["FlexLoRA+FedIT"] < first["HetLoRA"]

    assert "| FedIT / homo | FlexLoRA+FedIT / uniform | -0.4000 | 0.2000 | larger than the spread |" in lines
    assert "| FedIT / homo | FlexLoRA+FedIT / heavy-tail-light | -0.1000 | 0.1500 | within the spread |" in lines
    assert ("| FlexLoRA+FedIT / uniform | FlexLoRA+FedIT / heavy-tail-light | +0.3000 | 0.1500 | "
            "larger than the spread |") in lines
    # The single-seed row has no spread and is not compared.
    assert not any("HetLoRA / uniform |" in ln for ln in lines if "spread |" in ln)

    assert "| FedIT | homo | 1,000 | 500 | type1: 1,000 | 1.0000 | 300 |" in lines


def test_tail_energy_table_averages_seeds_by_round():
    # By hand: round 1 (0.3 + 0.4 + 0.5) / 3 = 0.4000, round 2 (0.2 + 0.2 + 0.5) / 3 = 0.3000.
    rows = [_row("FlexLoRA+FedIT", "uniform", s, 0.5, tail_energy={"1": t1, "2": t2})
            for s, (t1, t2) in enumerate(((0.3, 0.2), (0.4, 0.2), (0.5, 0.5)))]
    rows.append(_row("FedIT", "homo", 0, 0.2))  # no tail energy: not in the table
    lines = render_markdown(rows).splitlines()
    assert "| method | distribution | round 1 | round 2 |" in lines
    assert "| FlexLoRA+FedIT | uniform | 0.4000 | 0.3000 |" in lines
    assert not any(ln.startswith("| FedIT | homo | 0.") for ln in lines)


def test_write_report_files(tmp_path):
    paths = write_report(ROWS, tmp_path)
    names = {p.name for p in paths}
    assert names == {"results.md", "rougeL_per_round_ni.png", "rougeL_final.png", "tail_energy_ni.png"}
    assert all(p.stat().st_size > 0 for p in paths)


def test_collect_result_from_records():
    row = Row("demo/FLoRA/uniform/s0", "FLoRA", "uniform", "demo", 0, ("aggregator=flora",))
    records = [
        {"round": 1, "train_loss": 2.0, "aggregate_seconds": 0.1, "tail_energy": 0.5,
         "bytes": {"client00000": {"type": "type1", "up": 100, "down": 0},
                   "client00001": {"type": "type2", "up": 300, "down": 0}}},
        {"round": 2, "train_loss": 1.5, "aggregate_seconds": 0.3, "tail_energy": 0.25, "rougeL": 0.4,
         "eval_loss": 3.0, "rougeL_per_task": {"a": 0.4}, "rougeL_by_type": {"type1": 0.3},
         "bytes": {"client00000": {"type": "type1", "up": 100, "down": 400}}},
    ]
    r = collect_result(row, records, wall_seconds=1.0)
    assert r["id"] == row.id and r["sets"] == ["aggregator=flora"] and r["rounds"] == 2
    assert r["rougeL"] == {"2": 0.4} and r["rougeL_final"] == 0.4 and r["rougeL_by_type"] == {"type1": 0.3}
    assert r["train_loss"] == {"1": 2.0, "2": 1.5} and r["aggregate_seconds"] == {"1": 0.1, "2": 0.3}
    assert r["tail_energy"] == {"1": 0.5, "2": 0.25}
    assert r["bytes_up"] == {"per_round": {"1": 200.0, "2": 100.0}, "per_type": {"type1": 100.0, "type2": 300.0},
                             "mean": pytest.approx(500 / 3)}
    assert bytes_summary(records, "down")["per_round"] == {"1": 0.0, "2": 400.0}
    assert "tail_energy" not in collect_result(row, [{k: v for k, v in rec.items() if k != "tail_energy"}
                                                     for rec in records])


def test_grid_settings_drop_the_rows_own_overrides_and_rounds():
    from flexlora.bench.report import grid_settings

    row = {"config_sets": ["model=m", "rounds=4", "data=d", "aggregator=fedit", "seed=1", "eval.every=0"],
           "sets": ["aggregator=fedit", "seed=1"]}
    assert grid_settings(row) == ("model=m", "data=d", "eval.every=0")
    assert grid_settings({"config_sets": ["model=m"], "sets": []}) == ("model=m",)
    assert grid_settings({"sets": []}) is None  # a row written before config_sets were kept


def test_report_states_each_tables_settings_and_warns_when_they_differ():
    same = [dict(r, config_sets=["model=m", "data=d", *r["sets"]], rounds=4) for r in ROWS]
    md = render_markdown(same)
    assert "Settings of every row (preset quick; each row adds its method, distribution and seed): `model=m data=d`." in md
    assert "Rounds: 4." in md and "Warning" not in md
    # One row run on other data, one continued to more rounds: both are called out.
    mixed = [*same[:-2], dict(same[-2], config_sets=["model=m", "data=other"], rounds=8), same[-1]]
    md = render_markdown(mixed)
    assert "**Warning: these rows were run with 2 different settings**" in md
    assert "**Warning: the rows ran different numbers of rounds** (4 rounds: 9 rows, 8 rounds: 1 row)" in md
