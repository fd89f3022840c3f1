"""What a grid directory keeps when things go wrong: results.jsonl is never silently shortened,
a failed continuation keeps the row's previous result, and bad requests (a typo in --only, fewer
rounds, an interrupted row with other settings, a bad data set, --output on a file) stop before
anything runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flexlora.bench import BenchError
from flexlora.bench.quality import read_results, run_quality
from flexlora.cli.main import main

ROW = "demo/FedAvg/homo/s0"


def _quiet(m: str) -> None:
    pass


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A grid directory holding one finished training row of the smoke preset."""
    out = tmp_path_factory.mktemp("integrity") / "grid"
    res = run_quality("smoke", out, only=[ROW], log=_quiet)
    assert res.ran == [ROW] and not res.failed
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "grid"
    shutil.copytree(finished, out)
    return out


def _row(**fields) -> dict:
    return {"id": "demo/x/homo/s0", "method": "x", "distribution": "homo", "dataset": "demo", "seed": 0,
            "rougeL_final": 0.1, "rougeL": {"1": 0.1}, **fields}


def test_results_lines_are_checked_and_never_silently_dropped(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    good = json.dumps(_row())
    path.write_text("\ufeff" + good + "\n", encoding="utf-8")  # an editor's byte-order mark
    assert read_results(path, _quiet) == [_row()]
    for bad_line, needle in (("[1, 2]", "a JSON list, not an object"),
                             (json.dumps({"method": "FedIT"}), "field 'id' is None"),
                             (json.dumps(_row(rougeL_final=None)), "field 'rougeL_final' is None"),
                             (json.dumps(_row(seed=None)), "field 'seed' is None"),
                             (json.dumps(_row(rougeL={"last": 0.1})), "field 'rougeL' must map round numbers"),
                             ("{not json", "is not valid JSON")):
        path.write_text(bad_line + "\n" + good + "\n", encoding="utf-8")
        with pytest.raises(BenchError, match=rf"results.jsonl:1 .*{needle}.*fix or delete that line"):
            read_results(path, _quiet)
    # A torn last line (a write cut short) is skipped, but kept beside the file.
    path.write_text(good + "\n" + good[:25] + "\n", encoding="utf-8")
    warnings: list[str] = []
    assert read_results(path, warnings.append) == [_row()]
    assert "results.jsonl:2 is not valid JSON" in warnings[0]
    assert (tmp_path / "results.jsonl.bad").read_text() == good[:25] + "\n"
    path.write_bytes(good.encode() + b"\n\xff\n")
    with pytest.raises(BenchError, match="is not UTF-8 text"):
        read_results(path, _quiet)


def test_a_failed_continuation_keeps_the_rows_previous_result(finished: Path, tmp_path: Path) -> None:
    out = _copy(finished, tmp_path)
    (before,) = read_results(out / "results.jsonl", _quiet)
    ckpt = out / "runs" / ROW.replace("/", "__") / "checkpoints" / "latest.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # the continuation cannot load it
    # The next row succeeds and rewrites results.jsonl: the failed row's old result must be in it.
    other = "demo/FedIT/homo/s0"
    res = run_quality("smoke", out, only=[ROW, other], sets=[f"rounds={before['rounds'] + 1}"], log=_quiet)
    assert list(res.failed) == [ROW] and "corrupted or truncated" in res.failed[ROW] and res.ran == [other]
    rows = read_results(out / "results.jsonl", _quiet)
    assert [r["id"] for r in rows] == [ROW, other] and rows[0] == before


def test_fewer_rounds_than_a_finished_row_ran_are_refused(finished: Path, tmp_path: Path) -> None:
    out = _copy(finished, tmp_path)
    (before,) = read_results(out / "results.jsonl", _quiet)
    with pytest.raises(BenchError, match=rf"row {ROW} has run {before['rounds']} rounds.*can only grow"):
        run_quality("smoke", out, only=[ROW], sets=["rounds=1"], log=_quiet)
    assert read_results(out / "results.jsonl", _quiet) == [before]


def test_an_interrupted_row_with_other_settings_is_refused_before_it_runs(finished: Path, tmp_path: Path) -> None:
    out = _copy(finished, tmp_path)
    (out / "results.jsonl").unlink()  # the row's checkpoint stays: as if it had been interrupted
    with pytest.raises(BenchError, match=rf"row {ROW} was interrupted .* --only {ROW} --force"):
        run_quality("smoke", out, only=[ROW], sets=["eval.max_new_tokens=3"], log=_quiet)


def test_every_only_must_match_a_row(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match=r"--only 'demo/FedIT/hmo/s0': matches no row"):
        run_quality("smoke", tmp_path / "g", only=["demo/base", "demo/FedIT/hmo/s0"], log=_quiet)
    assert not (tmp_path / "g").exists()


def test_output_on_a_file_and_bad_data_exit_2_before_anything_is_written(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["bench", "quality", "--preset", "smoke", "--only", "demo/base", "--output", str(afile)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text('{"instruction": "a", "context": "", "response": "b", "category": "open_qa"}\n{"instr\n')
    out = tmp_path / "g"
    assert main(["bench", "quality", "--preset", "smoke", "--data", f"dolly={dolly}", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "data set dolly" in err and "line 2" in err and "Traceback" not in err
    assert not out.exists()


def test_a_data_set_without_unseen_examples_is_refused(tmp_path: Path) -> None:
    ni = tmp_path / "ni"
    (ni / "tasks").mkdir(parents=True)
    (ni / "splits" / "default").mkdir(parents=True)
    for t in ("t1", "t2", "u1"):
        inst = [] if t == "u1" else [{"id": f"{t}-{i}", "input": f"w{i}", "output": [f"w{i}"]} for i in range(4)]
        (ni / "tasks" / f"{t}.json").write_text(json.dumps({"Definition": [f"Repeat ({t})."], "Instances": inst}))
    (ni / "splits" / "default" / "train_tasks.txt").write_text("t1\nt2\n")
    (ni / "splits" / "default" / "test_tasks.txt").write_text("u1\n")
    with pytest.raises(BenchError, match="has no unseen-task examples to evaluate"):
        run_quality("smoke", tmp_path / "g", data=[f"ni={ni}"], only=["ni/base"], log=_quiet)
    assert not (tmp_path / "g").exists()


def test_rows_of_a_table_run_with_other_settings_are_refused(finished: Path, tmp_path: Path) -> None:
    # Another row of the same data set with another --set would share a table with the finished row.
    out = _copy(finished, tmp_path)
    with pytest.raises(BenchError, match=r"row demo/FedAvg/homo/s0 of data set demo was run with other settings "
                                         r"than these \(now: eval.max_new_tokens=3\); one table must not mix them"):
        run_quality("smoke", out, only=["demo/base"], sets=["eval.max_new_tokens=3"], log=_quiet)
    assert [r["id"] for r in read_results(out / "results.jsonl")] == [ROW]
    assert not (out / "runs" / "demo__base").exists()  # refused before the row started
