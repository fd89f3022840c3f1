"""A run directory survives every refused command: export never replaces the run or a directory
it did not write, a refused --resume leaves config.toml and partition.json as they were, a new
run does not overwrite an earlier one's outputs, and a checkpoint with wrong contents is refused
by name before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flexlora.cli.main import main

from .cli_common import TINY_BASE, as_sets, finished_run, snapshot

TINY = [*TINY_BASE, "rounds=2", "eval.max_tasks=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory, "integrity", TINY)


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(finished, d)
    return d


def test_export_never_replaces_the_run_or_a_foreign_directory(run: Path, tmp_path: Path, capsys) -> None:
    before = snapshot(run)
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for args, needle in ((["--merged", str(run)], "holds no earlier export (config.json)"),
                         (["--output", str(run)], "holds no earlier export (adapter_config.json)"),
                         (["--output", str(foreign)], "holds no earlier export"),
                         (["--output", str(tmp_path / "ok"), "--merged", str(run / "config.toml")],
                          "exists and is not a directory")):
        assert main(["export", str(run), *args]) == 2
        assert needle in capsys.readouterr().err
    assert snapshot(run) == before and (foreign / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "ok").exists()  # checked before the adapter was written
    # An earlier export of the same kind is replaced, as documented (the default RUN_DIR/adapter too).
    assert main(["export", str(run), "--output", str(tmp_path / "a")]) == 0
    assert main(["export", str(run), "--output", str(tmp_path / "a"), "--rank", "1"]) == 0
    assert main(["export", str(run)]) == 0


def test_a_refused_resume_leaves_the_run_resumable(run: Path, capsys) -> None:
    before = snapshot(run)
    assert main(["run", "--resume", str(run), "--set", "seed=7"]) == 2
    assert "different configuration" in capsys.readouterr().err
    assert main(["run", "--resume", str(run), "--set", "rounds=1"]) == 2
    assert "has already run 2 rounds, more than rounds = 1" in capsys.readouterr().err
    assert snapshot(run) == before
    assert main(["run", "--resume", str(run), "--set", "rounds=3", "--no-progress"]) == 0


def test_a_new_run_does_not_overwrite_an_earlier_runs_outputs(run: Path, capsys) -> None:
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    assert main(["run", *as_sets(TINY), "--set", "seed=3", "--output", str(run), "--no-progress"]) == 2
    assert "already holds outputs of an earlier run (metrics.jsonl, adapter)" in capsys.readouterr().err
    assert snapshot(run) == before


def test_resume_rewrites_metrics_from_the_checkpoint(run: Path) -> None:
    metrics = run / "metrics.jsonl"
    full = metrics.read_text()
    metrics.write_text(full.splitlines()[0] + "\n")  # as if killed between checkpoint and metrics
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    assert metrics.read_text() == full


def _tamper(run: Path, edit) -> None:
    path = run / "checkpoints" / "latest.pt"
    ckpt = torch.load(path, weights_only=False)
    edit(ckpt)
    torch.save(ckpt, path)


def _nan_state(c: dict) -> None:
    first = next(iter(c["global_state"]["modules"].values()))
    t = next(iter(first["tensors"].values()))
    t[(0,) * t.ndim] = float("nan")


def _wrong_shape(c: dict) -> None:
    first = next(iter(c["global_state"]["modules"].values()))
    first["shape"] = [first["shape"][0] + 1, first["shape"][1]]
    for k in ("U", "B"):
        if k in first["tensors"]:
            t = first["tensors"][k]
            first["tensors"][k] = torch.cat([t, t[:1]])


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.pop("fingerprint"), "malformed (no fingerprint)"),
    (lambda c: c.update(round=-5), "malformed (round -5)"),
    (lambda c: c.update(records="abc"), "records are not a list of rounds"),
    (lambda c: c["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), "is malformed"),
    (_nan_state, "holds NaN or Inf"),
    (_wrong_shape, "does not fit model"),
])
@pytest.mark.parametrize("command", ["resume", "eval", "export"])
def test_a_checkpoint_with_wrong_contents_is_refused_by_name(run: Path, capsys, edit, needle: str,
                                                             command: str) -> None:
    _tamper(run, edit)
    before = snapshot(run)
    args = {"resume": ["run", "--resume", str(run), "--set", "rounds=3"], "eval": ["eval", str(run)],
            "export": ["export", str(run), "--output", str(run.parent / "exported")]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert snapshot(run) == before


def test_a_slora_run_that_ends_inside_stage_1(tmp_path: Path, capsys) -> None:
    """Per-type scores need a LoRA to distribute, which stage 1 does not have: the run finishes
    without them; export says why there is no adapter; eval --base scores the base model itself."""
    out = tmp_path / "s"
    sets = [*TINY, "rounds=1", "aggregator=slora", "slora.then=flexlora", "slora.stage1_rounds=2",
            "eval.per_type=true"]
    assert main(["run", *as_sets(sets), "--output", str(out), "--no-progress"]) == 0
    assert main(["export", str(out), "--output", str(tmp_path / "a")]) == 2
    assert "has built none: SLoRA builds it at the end of its stage 1" in capsys.readouterr().err
    base = tmp_path / "base.json"
    assert main(["eval", str(out), "--base", "--json", str(base)]) == 0
    round0 = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert json.loads(base.read_text())["eval_loss"] == pytest.approx(round0["eval_loss"])


def test_a_run_directory_in_use_by_another_run_is_refused(run: Path, tmp_path: Path, capsys) -> None:
    """While a run holds RUN/.lock (flock), a second writer (a --resume here, a new run into an
    empty directory below) stops before it writes anything; eval and export only read and go on."""
    import fcntl

    def hold(d: Path):
        d.mkdir(parents=True, exist_ok=True)
        fh = open(d / ".lock", "a")  # noqa: SIM115 - another process's lock, held for the test
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fh

    fh = hold(run)
    try:
        before = snapshot(run)
        assert main(["run", "--resume", str(run), "--set", "rounds=3", "--no-progress"]) == 2
        assert "is being written by another flexlora run" in capsys.readouterr().err
        assert snapshot(run) == before
        assert main(["eval", str(run)]) == 0
    finally:
        fh.close()
    empty = tmp_path / "new"
    fh = hold(empty)
    try:
        assert main(["run", *as_sets(TINY), "--output", str(empty), "--no-progress"]) == 2
        assert sorted(p.name for p in empty.iterdir()) == [".lock"]
    finally:
        fh.close()
    assert main(["run", "--resume", str(run), "--set", "rounds=3", "--no-progress"]) == 0  # released: it runs


def test_eval_and_export_of_a_run_without_a_checkpoint_say_so(run: Path, capsys) -> None:
    shutil.rmtree(run / "checkpoints")
    for args in (["eval", str(run)], ["export", str(run), "--output", str(run.parent / "x")]):
        assert main(args) == 2
        assert "has no checkpoint yet (no round has finished)" in capsys.readouterr().err


def test_a_run_stopped_in_round_1_resumes_with_fewer_min_clients(tmp_path: Path, capsys) -> None:
    # Round 1 gets 2 replies where min_clients asks for 3: exit 3, and a round-0 checkpoint stays.
    d = tmp_path / "m3"
    assert main(["run", *as_sets([*TINY, "min_clients=3"]), "--output", str(d), "--no-progress"]) == 3
    err = capsys.readouterr().err
    assert "fewer than min_clients = 3" in err and f"--resume {d}" in err
    assert torch.load(d / "checkpoints" / "latest.pt", weights_only=False)["round"] == 0
    # Nothing to evaluate yet; a new run into it is pointed to --resume; a change of anything but
    # min_clients is still refused.
    assert main(["eval", str(d)]) == 2
    assert "has finished no round yet" in capsys.readouterr().err
    before = snapshot(d)
    assert main(["run", *as_sets([*TINY, "min_clients=1"]), "--output", str(d), "--no-progress"]) == 2
    assert f"already holds a run; continue it with --resume {d}" in capsys.readouterr().err
    assert main(["run", "--resume", str(d), "--set", "min_clients=1", "--set", "train.lr=1e-2", "--no-progress"]) == 2
    assert "(only `rounds`, `min_clients` and the [flower] settings may change)" in capsys.readouterr().err
    assert snapshot(d) == before
    # With min_clients lowered the run continues from round 1 and ends where one started with it ends.
    assert main(["run", "--resume", str(d), "--set", "min_clients=1", "--no-progress"]) == 0
    assert "min_clients changed from 3 to 1" in capsys.readouterr().err
    ref = tmp_path / "m1"
    assert main(["run", *as_sets([*TINY, "min_clients=1"]), "--output", str(ref), "--no-progress"]) == 0
    a = torch.load(d / "checkpoints" / "latest.pt", weights_only=False)
    b = torch.load(ref / "checkpoints" / "latest.pt", weights_only=False)
    assert a["round"] == b["round"] == 2
    for m, st in b["global_state"]["modules"].items():
        for k, t in st["tensors"].items():
            assert torch.equal(a["global_state"]["modules"][m]["tensors"][k], t), (m, k)


@pytest.mark.parametrize("method,edit,needle", [
    (["aggregator=slora", "slora.stage1_rounds=2"],
     lambda c: c.update(slora_change={"no.such.module": torch.zeros(3)}), "SLoRA stage-1 change is malformed"),
    (["aggregator=hetlora"], lambda c: c.update(pruned_ranks={"0": {"no.such.module": 2}}),
     "pruned ranks of client 0 do not fit"),
])
def test_a_method_state_that_does_not_fit_the_run_is_refused_by_name(tmp_path: Path, capsys, method, edit,
                                                                      needle: str) -> None:
    # The method's own checkpoint state (flexlora.methods.Method.restore) is checked like the rest.
    out = tmp_path / "r"
    sets = [*TINY, "rounds=1", "rank_distribution=homo", *method]
    assert main(["run", *as_sets(sets), "--output", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    _tamper(out, edit)
    before = snapshot(out)
    assert main(["run", "--resume", str(out), "--set", "rounds=2"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err
    assert snapshot(out) == before
