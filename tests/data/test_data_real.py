"""The real shared data sets (outside the repo); skipped when they are absent.

Expected counts are the ones stated in each data set's README.
"""

from __future__ import annotations

from pathlib import Path

from flexlora.data import (
    DOLLY_CATEGORIES,
    load_dolly,
    load_natural_instructions,
    load_task_data,
    partition_examples,
)

DOLLY_COUNTS = {
    "open_qa": 3742,
    "general_qa": 2191,
    "classification": 2136,
    "closed_qa": 1773,
    "brainstorming": 1766,
    "information_extraction": 1506,
    "summarization": 1188,
    "creative_writing": 709,
}


def test_natural_instructions(shared_data: Path) -> None:
    root = shared_data / "natural-instructions"
    data = load_task_data(root)
    assert len(data.train) == 55 and len(data.unseen) == 24
    assert data.num_train == 2452 and data.num_unseen == 1017
    counts = data.counts()
    # A few per-task counts from the README table.
    assert counts["train"]["task1146_country_capital"] == 79
    assert counts["train"]["task1508_wordnet_antonyms"] == 78
    assert counts["unseen"]["task1152_bard_analogical_reasoning_causation"] == 69
    assert counts["unseen"]["task1409_dart_text_generation"] == 23
    split = (root / "splits" / "default" / "train_tasks.txt").read_text().split()
    assert data.train_tasks == split
    ex = data.train["task1146_country_capital"][0]
    assert (ex.input, ex.output) == ("Afghanistan", "Kabul")
    assert ex.id == "task1146-caea1179adc149ffb2a3ecb2ea3abefc"
    assert ex.instruction.startswith("In this task, you are given a country name")
    # Several references are kept for Rouge-L.
    assert any(len(e.references) > 1 for e in data.iter_train())
    # One task = one client.
    part = partition_examples(data, 55, "natural")
    assert sorted(part.sizes()) == sorted(counts["train"].values())
    capped = load_natural_instructions(root, max_per_task=21)
    assert capped.num_train == 55 * 21


def test_dolly(shared_data: Path) -> None:
    path = shared_data / "dolly-15k" / "databricks-dolly-15k.jsonl"
    everything = load_dolly(path, unseen_categories=(), holdout_fraction=0.0)
    assert everything.num_train == 15011
    assert everything.counts()["train"] == DOLLY_COUNTS
    assert set(DOLLY_CATEGORIES) == set(DOLLY_COUNTS)
    assert everything.by_id()["dolly-15011"].task in DOLLY_COUNTS

    default = load_task_data(path)
    assert set(default.unseen) == {"summarization", "creative_writing"}
    assert default.num_unseen == 1188 + 709
    assert default.num_train == 15011 - 1188 - 709

    held = load_dolly(path, unseen_categories=(), holdout_fraction=0.1)
    assert held.unseen_kind == "instances"
    assert held.num_train + held.num_unseen == 15011
    assert held.counts()["unseen"]["creative_writing"] == round(0.1 * 709)
