"""The `flexlora` command line: eval, export, config, and error exits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexlora.cli.main import main

from .cli_common import TINY_BASE, finished_run, snapshot

TINY = [*TINY_BASE, "rounds=1", "eval.max_tasks=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory, "cli", TINY)


def test_eval_reproduces_the_runs_final_score(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", str(run_dir), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    last = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert res["rougeL"] == pytest.approx(last["rougeL"])
    assert res["eval_loss"] == pytest.approx(last["eval_loss"])


def test_eval_overrides_apply_and_leave_the_run_untouched(run_dir: Path, tmp_path: Path, capsys) -> None:
    """``--set eval.*`` changes what is evaluated (here one example per task instead of two), while
    the run opens with its own config: nothing in the run directory is rewritten, so the run can
    still be resumed with its checkpoint (a rewritten config.toml would no longer match it). The
    one file an evaluation adds is its saved answers, eval/eval.jsonl."""
    def run_files() -> dict[str, bytes]:
        return {k: v for k, v in snapshot(run_dir).items() if not k.startswith("eval/eval")}

    before = run_files()
    out = tmp_path / "eval1.json"
    assert main(["eval", str(run_dir), "--set", "eval.max_examples_per_task=1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["eval_examples"] == 2  # eval.max_tasks=2, one example each
    assert len((run_dir / "eval" / "eval.jsonl").read_text().splitlines()) == 2
    default = tmp_path / "eval2.json"
    assert main(["eval", str(run_dir), "--json", str(default)]) == 0
    assert json.loads(default.read_text())["eval_examples"] == 4
    assert main(["export", str(run_dir), "--output", str(tmp_path / "exported")]) == 0
    assert run_files() == before
    assert "resuming" not in capsys.readouterr().err


def test_eval_rejects_non_eval_overrides(run_dir: Path, capsys) -> None:
    assert main(["eval", str(run_dir), "--set", "rounds=3"]) == 2
    assert "eval.*" in capsys.readouterr().err


def test_export_at_another_rank_and_merged(run_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from flexlora.training.models import load_base_model

    out, merged = tmp_path / "a2", tmp_path / "merged"
    assert main(["export", str(run_dir), "--rank", "2", "--output", str(out), "--merged", str(merged)]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 or set(cfg.get("rank_pattern", {}).values()) == {2}
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert all(2 in t.shape for k, t in weights.items() if "lora_A" in k or "lora_B" in k)
    # The merged model equals base + the rank-2 adapter.
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[3, 14, 15, 92, 65]])
    base, _ = load_base_model("builtin:tiny-llama")
    want = PeftModel.from_pretrained(base, str(out))(input_ids=ids).logits
    got = AutoModelForCausalLM.from_pretrained(str(merged))(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_config_prints_every_key(capsys) -> None:
    assert main(["config"]) == 0
    text = capsys.readouterr().out
    assert "clients_per_round = 0.2" in text and "train.lr = " in text


def test_missing_config_file_exits_2(tmp_path: Path, capsys) -> None:
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_resume_of_a_directory_without_a_run(tmp_path: Path, capsys) -> None:
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "config.toml" in capsys.readouterr().err


def test_missing_data_path_exits_2_without_creating_the_run_dir(tmp_path: Path, capsys) -> None:
    out = tmp_path / "never"
    code = main(["run", "--set", "model=builtin:tiny-llama", "--set", f"data={tmp_path / 'missing.jsonl'}",
                 "--output", str(out), "--no-progress"])
    assert code == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["spec", "files"])
def test_a_model_that_cannot_load_exits_2_with_the_reason(tmp_path: Path, capsys, kind: str) -> None:
    """A model directory without config.json (a bad spec) or with a broken one (unreadable files)
    is bad input: exit 2, one error line naming the directory, no traceback, no run directory."""
    model = tmp_path / "model"
    model.mkdir()
    if kind == "files":
        (model / "config.json").write_text("{not json")
    out = tmp_path / "never"
    assert main(["run", "--set", f'model="{model}"', "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and str(model) in err and "Traceback" not in err
    assert ("no config.json" if kind == "spec" else "could not load the model directory") in err
    assert not out.exists()


@pytest.mark.parametrize("rank", ["0", "-3", "x"])
def test_export_rank_must_be_positive(run_dir: Path, rank: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", str(run_dir), "--rank", rank])
    assert exc.value.code == 2 and "--rank: must be a positive whole number" in capsys.readouterr().err


def test_version_is_the_installed_packages(capsys) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"flexlora {version('flexlora')}"


def test_eval_base_evaluates_the_base_model_and_saves_its_answers_apart(run_dir: Path, tmp_path: Path) -> None:
    run_res, base_res = tmp_path / "run.json", tmp_path / "base.json"
    assert main(["eval", str(run_dir), "--json", str(run_res)]) == 0
    assert main(["eval", str(run_dir), "--base", "--json", str(base_res)]) == 0
    a, b = json.loads(run_res.read_text()), json.loads(base_res.read_text())
    assert a["eval_loss"] != b["eval_loss"]  # the adapter is applied in one and not the other
    assert (run_dir / "eval" / "eval.jsonl").is_file() and (run_dir / "eval" / "eval_base.jsonl").is_file()
