"""builtin:demo-tasks: size, reproducibility, correctness of outputs, unseen split."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from flexlora.data import DEFAULT_UNSEEN_TASKS, DEMO_FAMILIES, DataError, load_demo_tasks

MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August",
    "September", "October", "November", "December",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def test_enough_families_and_default_split() -> None:
    data = load_demo_tasks()
    assert len(DEMO_FAMILIES) >= 24
    assert len(data.train) + len(data.unseen) == len(DEMO_FAMILIES)
    assert len(data.train) >= 20
    assert 5 <= len(data.unseen) <= 8
    assert set(data.unseen) == set(DEFAULT_UNSEEN_TASKS)
    assert not set(data.train) & set(data.unseen)
    assert data.counts()["train"] == {t: 40 for t in data.train}
    assert data.counts()["unseen"] == {t: 16 for t in data.unseen}


def test_every_unseen_family_has_a_trained_twin() -> None:
    data = load_demo_tasks()
    for name in data.unseen:
        twin = DEMO_FAMILIES[name].twin
        assert twin in data.train, name


def test_reproducible_and_seed_dependent() -> None:
    a = load_demo_tasks(seed=7)
    b = load_demo_tasks(seed=7)
    c = load_demo_tasks(seed=8)
    assert a == b
    assert [ex.id for ex in a.iter_train()] == [ex.id for ex in c.iter_train()]
    differing = sum(x.input != y.input for x, y in zip(a.iter_train(), c.iter_train()))
    assert differing > a.num_train // 2


def test_reproducible_across_processes() -> None:
    # str hashing is salted per process; the generator must not depend on it.
    import flexlora

    # A bare stand-in for the flexlora package skips its torch import (seconds per process).
    code = (
        "import sys, types; pkg = types.ModuleType('flexlora');"
        f"pkg.__path__ = [{str(Path(flexlora.__file__).parent)!r}];"
        "sys.modules['flexlora'] = pkg;"
        "from flexlora.data.demo_tasks import load_demo_tasks;"
        "d = load_demo_tasks(seed=5);"
        "print('|'.join(e.input + '=' + e.output for e in d.iter_train()))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": str(h), **_env()},
        ).stdout
        for h in (1, 2)
    }
    assert len(outs) == 1
    here = load_demo_tasks(seed=5)
    assert outs.pop().strip() == "|".join(e.input + "=" + e.output for e in here.iter_train())


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}


def test_ids_unique_and_stable() -> None:
    data = load_demo_tasks(train_per_task=5, unseen_per_task=3)
    ids = [ex.id for ex in data.iter_train()] + [ex.id for ex in data.iter_unseen()]
    assert len(ids) == len(set(ids))
    assert data.train["reverse_words"][0].id == "demo-reverse_words-000"
    # A family's examples do not depend on how many other examples are drawn before it.
    assert load_demo_tasks(train_per_task=5).train["add"] == data.train["add"]


def test_max_per_task_keeps_a_prefix() -> None:
    full = load_demo_tasks()
    capped = load_demo_tasks(max_per_task=10)
    assert capped.counts()["train"] == {t: 10 for t in full.train}
    assert capped.counts()["unseen"] == {t: 10 for t in full.unseen}
    # Also for families whose few distinct inputs run out (7 weekdays, 20 animals).
    for task in capped.train:
        assert capped.train[task] == full.train[task][:10], task
    for task in capped.unseen:
        assert capped.unseen[task] == full.unseen[task][:10], task


def _all(data):
    return {**data.train, **data.unseen}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_outputs_are_correct(seed: int) -> None:
    tasks = _all(load_demo_tasks(seed=seed))
    checks = {
        "reverse_words": lambda i: " ".join(i.split()[::-1]),
        "reverse_letters": lambda i: i[::-1],
        "uppercase": str.upper,
        "lowercase": str.lower,
        "count_words": lambda i: str(len(i.split())),
        "extract_numbers": lambda i: ", ".join(re.findall(r"\d+", i)),
        "first_letters": lambda i: "".join(w[0] for w in i.split()),
        "remove_vowels": lambda i: re.sub("[aeiou]", "", i),
        "repeat_word": lambda i: " ".join([i.split(", ")[0]] * int(i.split(", ")[1])),
        "last_word": lambda i: i.split()[-1],
        "count_letters": lambda i: str(len(i)),
        "add": lambda i: str(sum(int(x) for x in i.split(" + "))),
        "subtract": lambda i: str(int(i.split(" - ")[0]) - int(i.split(" - ")[1])),
        "multiply": lambda i: str(int(i.split(" * ")[0]) * int(i.split(" * ")[1])),
        "sort_ascending": lambda i: " ".join(str(n) for n in sorted(int(x) for x in i.split())),
        "sort_descending": lambda i: " ".join(
            str(n) for n in sorted((int(x) for x in i.split()), reverse=True)
        ),
        "max_number": lambda i: str(max(int(x) for x in i.split())),
        "min_number": lambda i: str(min(int(x) for x in i.split())),
        "parity": lambda i: "odd" if int(i) % 2 else "even",
        "next_letter": lambda i: chr(ord(i) + 1),
        "next_weekday": lambda i: DAYS[(DAYS.index(i) + 1) % 7],
        "previous_weekday": lambda i: DAYS[(DAYS.index(i) + 6) % 7],
        "celsius_to_fahrenheit": lambda i: str(round(int(i) * 1.8 + 32)),
        "date_to_text": lambda i: f"{MONTHS[int(i[5:7]) - 1]} {int(i[8:10])}, {i[:4]}",
    }
    for family, expected in checks.items():
        for ex in tasks[family]:
            assert ex.output == expected(ex.input), (family, ex.input, ex.output)


def test_longest_word_is_unique_maximum() -> None:
    for ex in load_demo_tasks(seed=3).train["longest_word"]:
        lengths = sorted((len(w) for w in ex.input.split()), reverse=True)
        assert lengths[0] > lengths[1]
        assert len(ex.output) == lengths[0] and ex.output in ex.input.split()


def test_sentiment_follows_lexicon() -> None:
    positive = {"wonderful", "great", "excellent", "lovely", "fantastic", "delightful", "superb"}
    for ex in load_demo_tasks(seed=4).train["sentiment"]:
        words = set(re.findall(r"[a-z]+", ex.input.lower()))
        assert ex.output == ("positive" if words & positive else "negative")


def test_outputs_are_short() -> None:
    data = load_demo_tasks()
    for ex in list(data.iter_train()) + list(data.iter_unseen()):
        assert 0 < len(ex.output) <= 40
        assert len(ex.output.split()) <= 6


def test_custom_unseen_and_errors() -> None:
    data = load_demo_tasks(unseen_tasks=["add", "plural"], unseen_per_task=4)
    assert set(data.unseen) == {"add", "plural"}
    assert "reverse_letters" in data.train
    assert load_demo_tasks(unseen_tasks=()).unseen == {}
    with pytest.raises(DataError, match="unknown demo task") as err:
        load_demo_tasks(unseen_tasks=["nope"])
    assert "reverse_words" in str(err.value)
    with pytest.raises(DataError):
        load_demo_tasks(train_per_task=0)
    with pytest.raises(DataError, match="nothing is left"):
        load_demo_tasks(unseen_tasks=list(DEMO_FAMILIES))
