"""Evaluations you can inspect: every evaluated round saves its answers, whose per-task means are
the metrics'; `flexlora eval --rescore` scores them again (stemming) without the model;
`flexlora show` prints them beside their references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from engine_common import run_cli, run_local

from flexlora.engines.evaluation import read_answers, rescore
from flexlora.training.evaluate import rouge_l

SETS = ["rounds=2", "eval.every=1", "eval.per_type=true", "eval.max_examples_per_task=3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return run_local(tmp_path_factory.mktemp("answers"), "r", SETS).run_dir


def test_each_evaluated_round_saves_answers_that_reproduce_the_metrics(run: Path) -> None:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    names = sorted(p.stem for p in (run / "eval").glob("*.jsonl"))
    type_names = sorted(records[-1]["rougeL_by_type"])
    assert names == sorted(["round_0", "round_1", "round_2", *(f"round_2_{t}" for t in type_names)])
    for rec in records:
        answers = read_answers(run / "eval" / f"round_{rec['round']}.jsonl")
        assert len(answers) == rec["eval_examples"]
        assert {"task", "id", "prediction", "references", "rougeL", "stem"} <= set(answers[0])
        # Each saved score is the Rouge-L of the saved answer, and the means are the run's metrics.
        for a in answers:
            assert a["rougeL"] == pytest.approx(rouge_l(a["prediction"], a["references"], stem=a["stem"]), abs=1e-12)
        again = rescore(answers, stem=False)
        assert again["rougeL"] == pytest.approx(rec["rougeL"], abs=1e-12)
        assert again["rougeL_per_task"] == pytest.approx(rec["rougeL_per_task"], abs=1e-12)
    for t in type_names:
        per_type = rescore(read_answers(run / "eval" / f"round_2_{t}.jsonl"), stem=False)["rougeL"]
        assert per_type == pytest.approx(records[-1]["rougeL_by_type"][t], abs=1e-12)


def test_rescore_stems_without_generating_and_show_prints_answers(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "stemmed.json"
    res = run_cli(["eval", str(run), "--rescore", "--set", "eval.stem=true", "--answers", "round_2", "--json", str(out)])
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(out.read_text())["round_2"]
    answers = read_answers(run / "eval" / "round_2.jsonl")
    want = sum(rouge_l(a["prediction"], a["references"], stem=True) for a in answers) / len(answers)
    assert got["stem"] is True and got["rougeL"] == pytest.approx(want, abs=1e-12) and got["answers"] == len(answers)
    assert "loaded in" not in res.stderr + res.stdout  # no model was loaded
    shown = run_cli(["show", str(run), "--per-task", "1"])
    assert shown.returncode == 0, shown.stderr[-2000:]
    tasks = sorted({a["task"] for a in answers})
    assert all(f"== {t}:" in shown.stdout for t in tasks)
    assert shown.stdout.count("answer:") == len(tasks) and repr(answers[0]["prediction"]) in shown.stdout
    assert "round_2.jsonl" in shown.stdout  # the last round's answers by default


def test_missing_or_bad_answers_are_named(run: Path, tmp_path: Path) -> None:
    res = run_cli(["eval", str(run), "--rescore", "--answers", "round_9"])
    assert res.returncode != 0 and "no saved answers" in res.stderr and "round_2" in res.stderr
    bad = tmp_path / "copy"
    (bad / "eval").mkdir(parents=True)
    (bad / "config.toml").write_text((run / "config.toml").read_text())
    (bad / "eval" / "round_1.jsonl").write_text('{"not": "an answer"}\n')
    res = run_cli(["eval", str(bad), "--rescore"])
    assert res.returncode != 0 and "line 1" in res.stderr and "round_1.jsonl" in res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.toml").write_text((run / "config.toml").read_text())
    res = run_cli(["show", str(empty)])
    assert res.returncode != 0 and "no saved answers" in res.stderr and "flexlora eval" in res.stderr
