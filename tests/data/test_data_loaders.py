"""Loaders on small hand-written fixtures: field mapping, counts, splits, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flexlora.data import (
    DataError,
    Example,
    TaskData,
    load_dolly,
    load_jsonl,
    load_natural_instructions,
    load_task_data,
    read_records,
)

# -- Natural Instructions ----------------------------------------------------------------


def test_ni_tasks_splits_and_counts(fixtures: Path) -> None:
    data = load_natural_instructions(fixtures / "ni")
    # Split-file order, blank lines skipped, the task in no split ignored.
    assert data.train_tasks == [
        "task002_word_plural",
        "task001_country_capital",
        "task003_sentiment",
    ]
    assert data.unseen_tasks == ["task901_antonyms", "task902_title_generation"]
    assert data.counts() == {
        "train": {"task002_word_plural": 3, "task001_country_capital": 4, "task003_sentiment": 2},
        "unseen": {"task901_antonyms": 3, "task902_title_generation": 2},
    }
    assert data.num_train == 9 and data.num_unseen == 5
    assert data.unseen_kind == "tasks"
    assert "task999-z1" not in data.by_id()


def test_ni_field_mapping(fixtures: Path) -> None:
    data = load_natural_instructions(fixtures / "ni")
    capital = data.train["task001_country_capital"]
    assert [ex.id for ex in capital] == ["task001-a1", "task001-a2", "task001-a3", "task001-a4"]
    assert capital[1] == Example(
        id="task001-a2",
        instruction="Return the capital city of the given country.",
        input="Peru",
        output="Lima",
        task="task001_country_capital",
        references=("Lima",),
    )
    plural = data.train["task002_word_plural"]
    # Two definition strings are joined; several references are all kept, first is output.
    assert plural[0].instruction == "Write the plural of the noun. Irregular plurals count."
    assert plural[1].output == "fish"
    assert plural[1].references == ("fish", "fishes")
    title = data.unseen["task902_title_generation"][0]
    assert title.references == ("New library approved", "Council backs library")
    assert title.task == "task902_title_generation"


def test_ni_options(fixtures: Path) -> None:
    capped = load_natural_instructions(fixtures / "ni", max_per_task=2)
    assert [ex.input for ex in capped.train["task001_country_capital"]] == ["Germany", "Peru"]
    assert capped.num_train == 2 + 2 + 2

    dropped = load_natural_instructions(fixtures / "ni", min_per_task=3)
    assert dropped.train_tasks == ["task002_word_plural", "task001_country_capital"]
    assert dropped.unseen_tasks == ["task901_antonyms"]

    bare = load_natural_instructions(fixtures / "ni", definition=False)
    assert all(ex.instruction == "" for ex in bare.iter_train())

    shots = load_natural_instructions(fixtures / "ni", num_positive_examples=1)
    instruction = shots.train["task001_country_capital"][0].instruction
    assert instruction == (
        "Return the capital city of the given country.\n\n"
        "Positive Example 1-\nInput: France\nOutput: Paris"
    )


def _copy_ni(fixtures: Path, tmp_path: Path) -> Path:
    root = tmp_path / "ni"
    shutil.copytree(fixtures / "ni", root)
    return root


def test_ni_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        load_natural_instructions(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)


def test_ni_missing_split_file(fixtures: Path, tmp_path: Path) -> None:
    root = _copy_ni(fixtures, tmp_path)
    (root / "splits" / "default" / "test_tasks.txt").unlink()
    with pytest.raises(DataError, match="test_tasks.txt") as err:
        load_natural_instructions(root)
    assert "Fix:" in str(err.value)


def test_ni_split_names_missing_task_file(fixtures: Path, tmp_path: Path) -> None:
    root = _copy_ni(fixtures, tmp_path)
    (root / "tasks" / "task001_country_capital.json").unlink()
    with pytest.raises(DataError) as err:
        load_natural_instructions(root)
    msg = str(err.value)
    # The split file and the line that names the task (line 2 of train_tasks.txt).
    assert "train_tasks.txt, line 2" in msg
    assert "task001_country_capital" in msg
    assert "remove the line" in msg


def test_ni_malformed_task_json(fixtures: Path, tmp_path: Path) -> None:
    root = _copy_ni(fixtures, tmp_path)
    path = root / "tasks" / "task003_sentiment.json"
    lines = path.read_text().splitlines()
    lines[5] = lines[5].rstrip(",")  # drop the comma after "Definition": the 6th line
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match="malformed JSON") as err:
        load_natural_instructions(root)
    assert f"{path}, line 7" in str(err.value)


def test_ni_instance_missing_output(fixtures: Path, tmp_path: Path) -> None:
    root = _copy_ni(fixtures, tmp_path)
    path = root / "tasks" / "task901_antonyms.json"
    doc = json.loads(path.read_text())
    del doc["Instances"][1]["output"]
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="'output'") as err:
        load_natural_instructions(root)
    assert f"{path}, instance 2" in str(err.value)


def test_ni_task_missing_instances_field(fixtures: Path, tmp_path: Path) -> None:
    root = _copy_ni(fixtures, tmp_path)
    path = root / "tasks" / "task002_word_plural.json"
    doc = json.loads(path.read_text())
    del doc["Instances"]
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="missing required field 'Instances'"):
        load_natural_instructions(root)


def test_ni_task_in_both_splits(fixtures: Path, tmp_path: Path) -> None:
    root = _copy_ni(fixtures, tmp_path)
    with (root / "splits" / "default" / "test_tasks.txt").open("a") as fh:
        fh.write("task003_sentiment\n")
    with pytest.raises(DataError, match="both splits"):
        load_natural_instructions(root)


def test_ni_no_train_tasks(fixtures: Path, tmp_path: Path) -> None:
    root = _copy_ni(fixtures, tmp_path)
    (root / "splits" / "default" / "train_tasks.txt").write_text("\n")
    with pytest.raises(DataError, match="no train task"):
        load_natural_instructions(root)


# -- Dolly -------------------------------------------------------------------------------


def test_dolly_mapping_and_default_unseen(fixtures: Path) -> None:
    data = load_dolly(fixtures / "dolly_tiny.jsonl")
    assert data.train_tasks == ["open_qa", "classification", "closed_qa"]
    assert sorted(data.unseen_tasks) == ["creative_writing", "summarization"]
    assert data.unseen_kind == "tasks"
    assert data.num_train == 7 and data.num_unseen == 3
    summary = data.unseen["summarization"][0]
    assert summary == Example(
        id="dolly-2",
        instruction="Summarize the paragraph.",
        input="The cat sat on the mat all day and slept.",
        output="A cat slept on a mat.",
        task="summarization",
    )
    assert summary.references == ("A cat slept on a mat.",)
    # Ids are 1-based line numbers: line 5 is blank, so the closed_qa record is line 6.
    assert [ex.id for ex in data.train["closed_qa"]] == ["dolly-6", "dolly-11"]
    assert data.train["open_qa"][0].input == ""


def test_dolly_holdout_instances_when_no_unseen_categories(fixtures: Path) -> None:
    data = load_dolly(fixtures / "dolly_tiny.jsonl", unseen_categories=(), holdout_fraction=0.5)
    assert data.unseen_kind == "instances"
    # Categories with >= 2 records hold out round(n / 2) (at least 1, at most n - 1).
    assert data.counts()["unseen"] == {
        "open_qa": 2,
        "summarization": 1,
        "classification": 1,
        "closed_qa": 1,
    }
    assert data.counts()["train"] == {
        "open_qa": 1,
        "summarization": 1,
        "classification": 1,
        "creative_writing": 1,
        "closed_qa": 1,
    }
    all_ids = sorted(ex.id for ex in data.iter_train()) + sorted(ex.id for ex in data.iter_unseen())
    assert len(set(all_ids)) == 10
    again = load_dolly(fixtures / "dolly_tiny.jsonl", unseen_categories=(), holdout_fraction=0.5)
    assert again == data
    none = load_dolly(fixtures / "dolly_tiny.jsonl", unseen_categories=(), holdout_fraction=0.0)
    assert none.unseen == {} and none.num_train == 10


def test_dolly_unknown_category(fixtures: Path) -> None:
    with pytest.raises(DataError, match="do not occur") as err:
        load_dolly(fixtures / "dolly_tiny.jsonl", unseen_categories=("poetry",))
    assert "closed_qa" in str(err.value)  # lists what is there


def test_dolly_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_dolly(tmp_path / "dolly.jsonl")


def test_dolly_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps({"instruction": "a", "context": "", "response": "b", "category": "open_qa"})
        + "\n"
        + json.dumps({"instruction": "a", "context": "", "category": "open_qa"})
        + "\n"
    )
    with pytest.raises(DataError, match="'response'") as err:
        load_dolly(path)
    assert f"{path}, line 2" in str(err.value)


def test_dolly_hub_name_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(**kwargs):
        raise OSError("We couldn't connect to the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DataError, match="pass its local path"):
        load_dolly("databricks/databricks-dolly-15k")


def test_dolly_hub_name_downloads(monkeypatch: pytest.MonkeyPatch, fixtures: Path) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return str(fixtures / "dolly_tiny.jsonl")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    data = load_task_data("databricks/databricks-dolly-15k")
    assert calls == [
        {
            "repo_id": "databricks/databricks-dolly-15k",
            "repo_type": "dataset",
            "filename": "databricks-dolly-15k.jsonl",
        }
    ]
    assert data.num_train + data.num_unseen == 10


# -- generic JSON / JSONL ----------------------------------------------------------------


def test_jsonl_custom_fields(fixtures: Path) -> None:
    data = load_jsonl(
        fixtures / "custom_fields.jsonl",
        instruction_field="prompt",
        input_field="ctx",
        output_field="answer",
        task_field="skill",
        id_field="uid",
        unseen_tasks=("trivia",),
    )
    assert data.counts() == {"train": {"math": 2, "translate": 2}, "unseen": {"trivia": 1}}
    by_id = data.by_id()
    assert by_id["q2"] == Example(
        id="q2",
        instruction="Add the numbers.",
        input="4 + 4",
        output="8",
        task="math",
        references=("8", "eight"),
    )
    assert by_id["q4"].input == ""  # optional input field absent
    assert by_id["q3"].output == "chat" and by_id["q3"].references == ("chat",)


def test_jsonl_json_list_without_tasks(fixtures: Path) -> None:
    data = load_jsonl(fixtures / "generic_list.json", task_field=None)
    assert data.train_tasks == ["generic_list"]
    ids = [ex.id for ex in data.iter_train()]
    assert ids == ["generic_list-1", "generic_list-2", "generic_list-3"]
    assert [ex.output for ex in data.iter_train()] == ["cba", "god", "hello"]
    named = load_jsonl(fixtures / "generic_list.json", task_field=None, default_task="reverse")
    assert named.train_tasks == ["reverse"]


def test_jsonl_missing_task_field_names_option(fixtures: Path) -> None:
    with pytest.raises(DataError, match="task_field=None") as err:
        load_jsonl(fixtures / "generic_list.json")
    assert "record 1" in str(err.value)


def test_jsonl_malformed_line(fixtures: Path) -> None:
    path = fixtures / "bad_malformed.jsonl"
    with pytest.raises(DataError, match="malformed JSON line") as err:
        load_jsonl(path)
    assert f"{path}, line 2" in str(err.value)


def test_jsonl_missing_output_field(fixtures: Path) -> None:
    path = fixtures / "bad_missing_field.jsonl"
    with pytest.raises(DataError, match="missing required field 'output'") as err:
        load_jsonl(path)
    assert f"{path}, line 3" in str(err.value)
    assert "output_field=" in str(err.value)


def test_jsonl_missing_instruction_field_names_option(fixtures: Path) -> None:
    with pytest.raises(DataError, match="instruction_field=") as err:
        load_jsonl(fixtures / "custom_fields.jsonl", task_field="skill")
    assert "line 1" in str(err.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="empty") as err:
        load_jsonl(path)
    assert str(path) in str(err.value)


def test_jsonl_empty_list(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(DataError, match="no records"):
        load_jsonl(path)


def test_jsonl_non_object_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"instruction": "a", "output": "b", "task": "t"}\n[1, 2]\n')
    with pytest.raises(DataError, match="expected a JSON object") as err:
        load_jsonl(path)
    assert "line 2" in str(err.value)


def test_jsonl_single_pretty_object_rejected(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text('{\n  "instruction": "a",\n  "output": "b"\n}\n')
    with pytest.raises(DataError, match="one JSON object"):
        read_records(path)


def test_jsonl_empty_reference_list(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"instruction": "a", "output": [], "task": "t"}\n')
    with pytest.raises(DataError, match="empty list") as err:
        load_jsonl(path)
    assert "line 1" in str(err.value)


def test_jsonl_duplicate_ids(tmp_path: Path) -> None:
    path = tmp_path / "dup.jsonl"
    rec = {"id": "same", "instruction": "a", "output": "b", "task": "t"}
    path.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(DataError, match="more than once") as err:
        load_jsonl(path)
    assert str(path) in str(err.value)


def test_jsonl_holdout_fraction(fixtures: Path) -> None:
    data = load_jsonl(
        fixtures / "custom_fields.jsonl",
        instruction_field="prompt",
        input_field="ctx",
        output_field="answer",
        task_field="skill",
        holdout_fraction=0.5,
    )
    assert data.unseen_kind == "instances"
    assert data.counts()["unseen"] == {"math": 1, "translate": 1}
    assert data.counts()["train"] == {"math": 1, "translate": 1, "trivia": 1}


def test_jsonl_max_per_task(fixtures: Path) -> None:
    data = load_jsonl(
        fixtures / "custom_fields.jsonl",
        instruction_field="prompt",
        input_field="ctx",
        output_field="answer",
        task_field="skill",
        id_field="uid",
        max_per_task=1,
    )
    assert [ex.id for ex in data.iter_train()] == ["q1", "q3", "q4"]


# -- TaskData invariants -----------------------------------------------------------------


def test_taskdata_rejects_overlap_and_duplicates() -> None:
    ex = Example(id="a", instruction="i", input="", output="o", task="t")
    with pytest.raises(DataError, match="both train and unseen"):
        TaskData(train={"t": [ex]}, unseen={"t": [Example("b", "i", "", "o", "t")]}, name="x")
    with pytest.raises(DataError, match="more than once"):
        TaskData(train={"t": [ex, ex]}, unseen={}, name="x")
    with pytest.raises(DataError, match="listed under"):
        TaskData(train={"other": [ex]}, unseen={}, name="x")


def test_example_references_default_to_output() -> None:
    ex = Example(id="a", instruction="i", input="", output="o", task="t")
    assert ex.references == ("o",)
    ex2 = Example(id="a", instruction="i", input="", output="o", task="t", references=["o", "p"])
    assert ex2.references == ("o", "p")
    hash(ex2)  # stays hashable


# -- dispatch ----------------------------------------------------------------------------


def test_dispatch(fixtures: Path) -> None:
    assert load_task_data("builtin:demo-tasks", seed=3).name.startswith("builtin:demo-tasks(seed=3")
    assert load_task_data(fixtures / "ni").name.startswith("natural-instructions:")
    dolly = load_task_data(str(fixtures / "dolly_tiny.jsonl"), unseen_categories=())
    assert dolly.name.startswith("dolly:") and dolly.unseen_kind == "instances"
    generic = load_task_data(fixtures / "generic_list.json", task_field=None)
    assert generic.name.startswith("jsonl:")


def test_uniform_options_across_loaders(fixtures: Path) -> None:
    custom = {
        "instruction_field": "prompt",
        "input_field": "ctx",
        "output_field": "answer",
        "task_field": "skill",
    }
    cases = [
        ("builtin:demo-tasks", "reverse_words", {}),
        (fixtures / "ni", "task001_country_capital", {}),
        (fixtures / "dolly_tiny.jsonl", "open_qa", {}),
        (fixtures / "custom_fields.jsonl", "math", custom),
    ]
    for spec, task, extra in cases:
        data = load_task_data(spec, max_per_task=1, unseen_tasks=[task], **extra)
        assert data.unseen_tasks == [task], spec
        assert {len(v) for v in data.train.values()} == {1}, spec
        assert len(data.unseen[task]) == 1
    with pytest.raises(DataError, match="only one"):
        load_task_data(
            fixtures / "dolly_tiny.jsonl", unseen_tasks=["open_qa"], unseen_categories=["open_qa"]
        )


def test_ni_unseen_tasks_override(fixtures: Path) -> None:
    data = load_natural_instructions(
        fixtures / "ni", unseen_tasks=["task003_sentiment", "task901_antonyms"]
    )
    assert data.unseen_tasks == ["task003_sentiment", "task901_antonyms"]
    assert data.train_tasks == [
        "task002_word_plural",
        "task001_country_capital",
        "task902_title_generation",
    ]
    with pytest.raises(DataError, match="neither split file"):
        load_natural_instructions(fixtures / "ni", unseen_tasks=["task999_not_in_any_split"])


def test_dispatch_unknown_spec(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file") as err:
        load_task_data(str(tmp_path / "missing.jsonl"))
    msg = str(err.value)
    assert "builtin:demo-tasks" in msg and "tasks/ and splits/" in msg
    with pytest.raises(DataError, match="unknown builtin"):
        load_task_data("builtin:nope")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_task_data(tmp_path / "data.csv")
    with pytest.raises(DataError, match="no tasks/ and splits/"):
        load_task_data(tmp_path)


def test_dispatch_rejects_unknown_option(fixtures: Path) -> None:
    with pytest.raises(DataError, match="does not take option") as err:
        load_task_data(fixtures / "ni", alpha=0.3)
    assert "max_per_task" in str(err.value)


@pytest.mark.parametrize("field,value,needle", [
    ("task", None, "field 'task' must be a non-empty string, got None"),
    ("task", "", "field 'task' must be a non-empty string, got ''"),
    ("task", ["a"], "field 'task' must be a non-empty string, got ['a']"),
    ("task", 3, "field 'task' must be a non-empty string, got 3"),
    ("id", False, "field 'id' must be a non-empty string or an int, got False"),
    ("id", {"x": 1}, "field 'id' must be a non-empty string or an int"),
    ("id", "\ud800", "field 'id' holds an unpaired surrogate"),
    ("instruction", "ok \udc00", "field 'instruction' holds an unpaired surrogate"),
    ("output", ["fine", "\ud800"], "field 'output' holds an unpaired surrogate"),
])
def test_jsonl_task_id_and_text_values_are_checked(tmp_path: Path, field: str, value, needle: str) -> None:
    """A null, bool, list or object task or id would become a task called 'None' or "['a']"; a lone
    surrogate (from a \\ud800 escape) would fail much later without a line. Both name the line."""
    good = {"task": "t", "id": "t-1", "instruction": "say hi", "output": "hi"}
    path = tmp_path / "d.jsonl"
    # json.dumps writes a lone surrogate as the \ud800 escape, as such files hold it.
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "t-2", field: value}) + "\n")
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert needle in str(err.value) and f"{path}, line 2" in str(err.value)


def test_jsonl_int_ids_are_kept_as_their_text(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"task": "t", "id": i, "instruction": "q", "output": "a"}) + "\n"
                            for i in (7, 8, 9)))
    data = load_jsonl(path, holdout_fraction=0.34)
    assert sorted(ex.id for exs in (*data.train.values(), *data.unseen.values()) for ex in exs) == ["7", "8", "9"]
