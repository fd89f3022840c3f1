"""The generic loader's field names through :func:`load_task_data` (as a run config passes them),
fixes in the command-line form, and the separate evaluation sets of :func:`load_eval_data`."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest

from flexlora.data import (
    JSONL_FIELD_DEFAULTS,
    DataError,
    Example,
    load_eval_data,
    load_jsonl,
    load_task_data,
)

# A file as a new user brings it: every field under another name than the loader's defaults.
RECORDS = [
    {"uid": "r1", "category": "math", "prompt": "Add the numbers.", "context": "2 + 3", "response": "5"},
    {"uid": "r2", "category": "geo", "prompt": "Name the capital.", "context": "France", "response": "Paris"},
    {"uid": "r3", "category": "math", "prompt": "Multiply.", "context": "3 * 4", "response": "12"},
    {"uid": "r4", "category": "spell", "prompt": "Spell it backwards.", "context": "", "response": "tac"},
    {"uid": "r5", "category": "geo", "prompt": "Name the river.", "context": "Paris", "response": "Seine"},
]
FIELDS = {
    "task_field": "category",
    "instruction_field": "prompt",
    "input_field": "context",
    "output_field": "response",
    "id_field": "uid",
}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _expected(records: list[dict]) -> dict[str, list[Example]]:
    """The task -> examples mapping the records should give, built straight from the records."""
    out: dict[str, list[Example]] = {}
    for r in records:
        out.setdefault(r["category"], []).append(
            Example(id=r["uid"], instruction=r["prompt"], input=r["context"], output=r["response"],
                    task=r["category"])
        )
    return out


@pytest.fixture()
def renamed(tmp_path: Path) -> Path:
    return _write_jsonl(tmp_path / "renamed.jsonl", RECORDS)


def test_field_defaults_are_the_generic_loaders() -> None:
    params = inspect.signature(load_jsonl).parameters
    assert {k: params[k].default for k in JSONL_FIELD_DEFAULTS} == JSONL_FIELD_DEFAULTS


def test_renamed_fields_load_exactly_the_records(renamed: Path) -> None:
    data = load_task_data(renamed, option_prefix="data_options.", **FIELDS)
    assert data.name.startswith("jsonl:")
    assert data.train == _expected(RECORDS)
    assert list(data.train) == ["math", "geo", "spell"]  # first occurrence order
    assert data.unseen == {}


def test_missing_fields_suggest_the_set_override(renamed: Path) -> None:
    with pytest.raises(DataError) as err:
        load_task_data(renamed, option_prefix="data_options.")
    msg = str(err.value)
    assert msg.startswith(f"{renamed}, line 1: missing required fields 'task', 'instruction', 'output'")
    assert "fields present: ['category', 'context', 'prompt', 'response', 'uid']" in msg
    for option in ("task_field", "instruction_field", "output_field"):
        assert f"--set data_options.{option}=<name>" in msg
    assert '--set data_options.task_field=""' in msg  # the config's "one task for all"
    # A library caller is told about keyword arguments instead.
    with pytest.raises(DataError) as lib:
        load_task_data(renamed)
    assert "pass task_field=<name>" in str(lib.value) and "--set" not in str(lib.value)


def test_one_missing_field_names_only_that_option(renamed: Path) -> None:
    fields = {k: v for k, v in FIELDS.items() if k != "output_field"}
    with pytest.raises(DataError) as err:
        load_task_data(renamed, option_prefix="eval.", **fields)
    msg = str(err.value)
    assert "missing required field 'output' " in msg
    assert "--set eval.output_field=<name>" in msg
    assert "task_field" not in msg


def test_none_fields_number_records_and_merge_tasks(renamed: Path) -> None:
    fields = {**FIELDS, "task_field": None, "id_field": None, "input_field": None}
    data = load_task_data(renamed, **fields)
    assert list(data.train) == ["renamed"]
    exs = data.train["renamed"]
    assert [ex.id for ex in exs] == [f"renamed-{i}" for i in range(1, 6)]
    assert [ex.input for ex in exs] == [""] * 5
    assert [ex.output for ex in exs] == [r["response"] for r in RECORDS]


def test_duplicate_ids_suggest_numbering(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "dup.jsonl", [RECORDS[0], {**RECORDS[1], "uid": "r1"}])
    with pytest.raises(DataError, match="more than once") as err:
        load_task_data(path, option_prefix="data_options.", **FIELDS)
    assert str(path) in str(err.value)
    assert '--set data_options.id_field=""' in str(err.value)


def test_field_names_read_a_dolly_shaped_file_generically(fixtures: Path) -> None:
    # Without field names the file is Dolly (two categories held out); with them it is generic.
    dolly = load_task_data(fixtures / "dolly_tiny.jsonl")
    assert dolly.name.startswith("dolly:")
    generic = load_task_data(fixtures / "dolly_tiny.jsonl", task_field="category", input_field="context",
                             output_field="response")
    assert generic.name.startswith("jsonl:") and generic.unseen == {}
    assert generic.num_train == dolly.num_train + dolly.num_unseen


@pytest.mark.parametrize("spec", ["builtin:demo-tasks", "ni"])
def test_field_names_for_other_sources_are_rejected(fixtures: Path, spec: str) -> None:
    path = spec if spec.startswith("builtin:") else fixtures / spec
    with pytest.raises(DataError) as err:
        load_task_data(path, option_prefix="data_options.", task_field="category")
    msg = str(err.value)
    assert "['data_options.task_field']" in msg and "only to a generic JSON/JSONL file" in msg
    assert "remove data_options.task_field from the config" in msg


def test_missing_spec_names_the_config_key(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as err:
        load_task_data(missing, spec_key="data")
    assert str(err.value).startswith(f"{missing}: no such file or directory.")
    assert "--set data=<path>" in str(err.value)


# -- load_eval_data ------------------------------------------------------------------------


def test_eval_data_from_jsonl_is_every_task_in_it(renamed: Path) -> None:
    data = load_eval_data(renamed, option_prefix="eval.", **FIELDS)
    assert data.train == {}
    assert data.unseen == _expected(RECORDS)
    assert data.unseen_kind == "tasks"
    capped = load_eval_data(renamed, max_per_task=1, **FIELDS)
    assert capped.unseen == {t: exs[:1] for t, exs in _expected(RECORDS).items()}


def test_eval_data_from_dolly_is_every_category(fixtures: Path) -> None:
    path = fixtures / "dolly_tiny.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    data = load_eval_data(path)
    assert data.counts()["unseen"] == {c: sum(r["category"] == c for r in records)
                                       for c in dict.fromkeys(r["category"] for r in records)}


def test_eval_data_from_ni_is_its_test_tasks(fixtures: Path, tmp_path: Path) -> None:
    root = tmp_path / "ni"
    shutil.copytree(fixtures / "ni", root)
    # An evaluation-only directory needs no train tasks.
    (root / "splits" / "default" / "train_tasks.txt").write_text("")
    data = load_eval_data(root, max_per_task=2)
    assert data.train == {}
    assert list(data.unseen) == ["task901_antonyms", "task902_title_generation"]
    assert data.counts()["unseen"] == {"task901_antonyms": 2, "task902_title_generation": 2}
    (root / "splits" / "default" / "test_tasks.txt").write_text("")
    with pytest.raises(DataError, match="no test task") as err:
        load_eval_data(root)
    assert "test_tasks.txt" in str(err.value)


def test_eval_data_errors_name_file_problem_and_fix(renamed: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_eval_data(renamed, option_prefix="eval.")
    assert str(renamed) in str(err.value) and "--set eval.task_field=<name>" in str(err.value)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(DataError, match="malformed JSON line") as err:
        load_eval_data(bad, **FIELDS)
    assert f"{bad}, line 2" in str(err.value) and "Fix:" in str(err.value)

    with pytest.raises(DataError) as err:
        load_eval_data(tmp_path / "missing.jsonl", spec_key="eval.data")
    assert "no such file or directory" in str(err.value) and "--set eval.data=<path>" in str(err.value)

    with pytest.raises(DataError, match="does not take"):
        load_eval_data(renamed, unseen_tasks=["math"])


def test_eval_data_from_shared_natural_instructions(shared_data: Path) -> None:
    root = shared_data / "natural-instructions"
    data = load_eval_data(root)
    # The test split of the shared copy: 24 tasks, 1017 instances (its README).
    assert len(data.unseen) == 24 and data.num_unseen == 1017 and data.train == {}
    assert list(data.unseen) == (root / "splits" / "default" / "test_tasks.txt").read_text().split()
