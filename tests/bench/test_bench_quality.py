"""``flexlora bench quality`` end to end: the smoke grid through the CLI, and a grid killed in the
middle of a run that resumes it."""

from __future__ import annotations

import json
import math
import signal

import pytest
from bench_common import results_ids, run_bench, tail

from flexlora.bench.grid import grid_rows
from flexlora.engines.config import load_config
from flexlora.engines.federation import deterministic_view
from flexlora.engines.outputs import read_metrics


def _read(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def smoke_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "smoke"
    proc = run_bench(["--preset", "smoke", "--output", str(out)])
    assert proc.returncode == 0, tail(proc)
    return out, proc


def test_smoke_grid_end_to_end(smoke_grid):
    out, proc = smoke_grid
    expected = [r.id for r in grid_rows("smoke")]
    ids = results_ids(out)
    assert sorted(ids) == sorted(expected)
    assert len(ids) == len(set(ids)) == len(expected)
    for rid in ("demo/base", "demo/FedAvg/homo/s0", "demo/FedIT/homo/s0", "demo/FlexLoRA+FedAvg/uniform/s0",
                "demo/FlexLoRA+FedIT/uniform/s0", "demo/HetLoRA/uniform/s0", "demo/FLoRA/uniform/s0",
                "demo/FedIT-rich/homo/s0"):
        assert rid in ids
    assert ids.count("demo/base") == 1

    results = {r["id"]: r for r in _read(out)}
    for r in results.values():
        assert 0.0 <= r["rougeL_final"] <= 1.0, r["id"]
        assert not math.isnan(r["rougeL_final"])
        assert r["rougeL_per_task"], r["id"]
    base = results["demo/base"]
    assert base["method"] == "base" and set(base["rougeL"]) == {"0"}

    for rid, r in results.items():
        if rid == "demo/base":
            continue
        assert r["rounds"] == 2 and set(r["train_loss"]) == {"1", "2"}
        assert set(r["rougeL"]) == {"1", "2"}  # eval.every=1 in the smoke preset
        assert r["bytes_up"]["mean"] > 0 and r["bytes_up"]["per_type"]
        assert set(r["aggregate_seconds"]) == {"1", "2"}
        assert r["wall_seconds"] > 0 and r["resumed"] is False
        # Every training row skips the base evaluation: the base row is the only one.
        records = read_metrics(out / "runs" / rid.replace("/", "__") / "metrics.jsonl")
        assert [rec["round"] for rec in records] == [1, 2]
        assert "eval.baseline=false" in r["config_sets"]

    # The rows' settings reached the runs.
    rich = results["demo/FedIT-rich/homo/s0"]
    assert "lora.types=[[8, 16]]" in rich["sets"]
    assert set(rich["bytes_up"]["per_type"]) == {"type1"}
    fedavg = (out / "runs" / "demo__FedAvg__homo__s0" / "config.toml").read_text()
    assert 'optimizer = "sgd"' in fedavg and 'aggregator = "fedavg"' in fedavg
    het = results["demo/FlexLoRA+FedIT/uniform/s0"]
    assert len(het["bytes_up"]["per_type"]) >= 1

    md = (out / "results.md").read_text()
    assert "## Data set: demo" in md and "Base model (untuned): Rouge-L" in md
    assert "| FlexLoRA+FedIT |" in md and "### Differences larger than the spread" in md
    for png in ("rougeL_final.png", "rougeL_per_round_demo.png"):
        assert (out / png).stat().st_size > 0, png
    if any(r.get("tail_energy") for r in results.values()):
        assert (out / "tail_energy_demo.png").stat().st_size > 0


def test_slora_rows_are_in_the_grid():
    load_config(None, ["aggregator=slora"])  # a config regression fails here, it is not skipped
    ids = [r.id for r in grid_rows("smoke")]
    assert "demo/SLoRA/homo/s0" in ids and "demo/FlexLoRA+SLoRA/uniform/s0" in ids


def test_rslora_rows_are_in_the_grid():
    load_config(None, ["lora.rslora=true"])
    ids = [r.id for r in grid_rows("smoke")]
    assert "demo/FlexLoRA+FedIT-rsLoRA/uniform/s0" in ids


def test_robust_and_dp_rows_are_in_the_grid():
    rows = {r.id: r for r in grid_rows("smoke")}
    clipped, dp = rows["demo/FlexLoRA+FedIT-clipped/uniform/s0"], rows["demo/FlexLoRA+FedIT-DP-eps=8/uniform/s0"]
    assert "privacy.adaptive_quantile=0.5" in clipped.sets and "privacy.clip_norm=1.0" in clipped.sets
    assert "privacy.target_epsilon=8.0" in dp.sets and "privacy.reproducible=true" in dp.sets
    for row in (clipped, dp):
        load_config(None, list(row.sets))  # every row's overrides are a valid config


def test_killed_grid_resumes_the_interrupted_row(tmp_path):
    out = tmp_path / "grid"
    first = "demo/FedAvg/homo/s0"
    # Two rows of the grid (the whole grid runs in the smoke-grid fixture): one finished before the kill.
    two = ["--only", "demo/FedAvg/", "--only", "demo/FedIT/homo/s0"]
    proc = run_bench(["--preset", "smoke", "--only", "demo/FedAvg/", "--output", str(out)])
    assert proc.returncode == 0, tail(proc)
    assert results_ids(out) == [first]

    # The test seam's hook SIGKILLs the process in round 2 after its first client, in the first row
    # that trains: the grid's next unfinished row.
    rows = [r for r in grid_rows("smoke") if not r.is_base]
    victim = next(r for r in rows if r.id != first)
    assert victim.id == "demo/FedIT/homo/s0"
    killed = run_bench(["--preset", "smoke", *two, "--output", str(out)], plan="kill-after-client=2:1")
    assert killed.returncode == -signal.SIGKILL, tail(killed)
    assert results_ids(out) == [first]
    victim_dir = out / "runs" / victim.dirname
    assert (victim_dir / "checkpoints" / "latest.pt").is_file()
    assert [r["round"] for r in read_metrics(victim_dir / "metrics.jsonl")] == [1]

    finished = {first: (out / "runs" / first.replace("/", "__") / "metrics.jsonl").stat().st_mtime_ns}
    resumed = run_bench(["--preset", "smoke", *two, "--output", str(out)])
    assert resumed.returncode == 0, tail(resumed)
    log = resumed.stderr
    assert f"{first}: skipped" in log
    assert f"{victim.id}: resuming from its checkpoint" in log
    assert sorted(results_ids(out)) == sorted([first, victim.id])
    for rid, mtime in finished.items():  # not run again
        assert (out / "runs" / rid.replace("/", "__") / "metrics.jsonl").stat().st_mtime_ns == mtime, rid
    result = next(r for r in _read(out) if r["id"] == victim.id)
    assert result["resumed"] is True

    # The interrupted row equals the same row run alone, uninterrupted.
    alone = tmp_path / "alone"
    proc = run_bench(["--preset", "smoke", "--only", victim.id, "--output", str(alone)])
    assert proc.returncode == 0, tail(proc)
    assert results_ids(alone) == [victim.id]
    got = deterministic_view(read_metrics(victim_dir / "metrics.jsonl"))
    want = deterministic_view(read_metrics(alone / "runs" / victim.dirname / "metrics.jsonl"))
    assert [r["round"] for r in got] == [1, 2]
    assert got == want
    ref = next(r for r in _read(alone) if r["id"] == victim.id)
    assert result["rougeL_final"] == ref["rougeL_final"] and result["train_loss"] == ref["train_loss"]
