"""Config loading, overrides and validation."""

from __future__ import annotations

import tomllib

import pytest

from flexlora.engines.config import (
    ConfigError,
    RunConfig,
    describe,
    from_dict,
    load_config,
    parse_override,
    to_toml,
)


def test_defaults_are_the_documented_demo() -> None:
    cfg = RunConfig()
    assert cfg.model == "builtin:smollm2-135m-instruct"
    assert cfg.data == "builtin:demo-tasks"
    assert cfg.aggregator == "flexlora"
    assert cfg.rank_distribution == "uniform"


@pytest.mark.parametrize(
    "item, key, value",
    [
        ("rounds=5", ["rounds"], 5),
        ("train.lr=1e-3", ["train", "lr"], 1e-3),
        ("model=builtin:tiny-llama", ["model"], "builtin:tiny-llama"),
        ('model="a b"', ["model"], "a b"),
        ("train.train_on_inputs=true", ["train", "train_on_inputs"], True),
        ("lora.types=[[4, 8], [8, 16]]", ["lora", "types"], [[4, 8], [8, 16]]),
        ("data=../shared/data/x.jsonl", ["data"], "../shared/data/x.jsonl"),
    ],
)
def test_parse_override(item: str, key: list[str], value: object) -> None:
    assert parse_override(item) == (key, value)


def test_override_without_equals_is_rejected() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("rounds")


def test_every_issue_key_is_settable() -> None:
    sets = [
        "model=builtin:tiny-llama", "data=builtin:demo-tasks", "aggregator=hetlora",
        "rank_distribution=normal", "num_clients=7", "clients_per_round=3", "rounds=4",
        "local_steps=2", "seed=11",
    ]
    cfg = load_config(None, sets)
    assert (cfg.model, cfg.aggregator, cfg.rank_distribution) == ("builtin:tiny-llama", "hetlora", "normal")
    assert (cfg.num_clients, cfg.clients_per_round, cfg.rounds, cfg.local_steps, cfg.seed) == (7, 3.0, 4, 2, 11)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["roundz=3"], "unknown config key 'roundz'; did you mean 'rounds'"),
        (["train.lrr=1"], "unknown config key 'train.lrr'"),
        (["rounds=\"three\""], "config key 'rounds': must be int"),
        (["rounds=0"], "config key 'rounds'"),
        (["aggregator=foo"], "unknown aggregator 'foo'"),
        (["rank_distribution=pareto"], "unknown distribution 'pareto'"),
        (["train.optimizer=adam"], "config key 'train.optimizer': must be one of"),
        (["clients_per_round=2.5"], "config key 'clients_per_round'"),
        (["clients_per_round=0"], "config key 'clients_per_round'"),
        (["train.lr=-1"], "config key 'train.lr'"),
        (["lora.types=[[4]]"], "config key 'lora.types'"),
        (["lora.dropout=1.5"], "config key 'lora.dropout'"),
        (["local_steps=0"], "train.epochs must be > 0"),
        (["seed=true"], "config key 'seed': must be int"),
        (['data_options.unseen_tasks=[["reverse_words"]]'], "config key 'data_options.unseen_tasks': must be a list"),
        # Caught here, before the model loads, rather than deep in training or sampling.
        (["lora.types=[[true, 8]]"], "config key 'lora.types': ranks must be positive ints, not true/false"),
        (["num_clients=1", "lora.ranks=[[true, 8]]"], "config key 'lora.ranks': ranks must be positive ints"),
        (["lora.types=[[200, 200], [8, 8]]"], "config key 'lora.types': list the types smallest first"),
        (["lora.alpha=nan"], "config key 'lora.alpha': must be a finite number, got nan"),
        (["train.lr=inf"], "config key 'train.lr': must be a finite number, got inf"),
        (["data_options.dirichlet_alpha=nan"], "config key 'data_options.dirichlet_alpha': must be a finite number"),
        (["train.lr=1" + "0" * 400], "config key 'train.lr': must be a finite number, got an int of 401 digits"),
        (["seed=-1"], "config key 'seed': must be >= 0"),
        (["train.momentum=0.9"], "config key 'train.momentum': applies to optimizer 'sgd' only"),
        (["train.optimizer=\"sgd\"", "train.momentum=1.5"], "config key 'train.momentum': must be in [0, 1)"),
        (["aggregator=hetlora", "hetlora.gamma=-3"], "config key 'hetlora.gamma': must be a fraction in (0, 1]"),
        (["aggregator=hetlora", "hetlora.min_rank=-5"], "config key 'hetlora.min_rank': must be >= 0"),
        # Older configs' keys are read into the method's section, and checked there.
        (["aggregator=hetlora", "train.hetlora_gamma=-3"], "config key 'hetlora.gamma': must be a fraction"),
        (["hetlora.gamma=0.5"], "section [hetlora] holds the settings of method 'hetlora', but aggregator = "
                                "'flexlora' does not read them"),
        (["aggregator=fedavg", "num_clients=2", "lora.ranks=[4, 8]"], "every client needs the same ranks"),
        (["aggregator=slora", "num_clients=2", "lora.ranks=[4, 8]"], "every client needs the same ranks"),
        # Aggregator settings are checked before the model loads; an unknown one lists the valid ones.
        (["flexlora.foo=1"], "unknown config key 'flexlora.foo'; its settings are max_rank, "),
        (["aggregator_options.foo=1"], "unknown config key 'flexlora.foo'; its settings are max_rank, "),
        (["aggregator=hetlora", "hetlora.gama=2"], "unknown config key 'hetlora.gama'; did you mean 'gamma'?"),
        (['flexlora.svd_method="qrr"'], "config key 'flexlora.svd_method': must be one of"),
        (['aggregator_options.svd_method="qrr"'], "config key 'flexlora.svd_method': must be one of"),
        (["aggregator=slora", 'slora.then="flexlora"', 'flexlora.remedy="x"'],
         "config key 'flexlora.remedy': must be one of"),
        (["aggregator=slora", 'slora.then="flexlora"', 'aggregator_options.remedy="x"'],
         "config key 'flexlora.remedy': must be one of"),
        (["aggregator=fedit", "fedit.x=1"], "unknown config key 'fedit.x'; method 'fedit' has no settings"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert needle in str(exc.value)


def test_section_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match="'train': must be a table"):
        from_dict({"train": 3})


def test_int_is_accepted_for_float_fields() -> None:
    cfg = load_config(None, ["train.lr=1"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0


def test_toml_file_and_override_precedence(tmp_path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('rounds = 7\naggregator = "fedavg"\n[train]\nlr = 0.01\n')
    cfg = load_config(p, ["rounds=9"])
    assert (cfg.rounds, cfg.aggregator, cfg.train.lr) == (9, "fedavg", 0.01)


def test_yaml_file(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("rounds: 6\ntrain:\n  micro_batch_size: 2\n")
    cfg = load_config(p)
    assert (cfg.rounds, cfg.train.micro_batch_size) == (6, 2)
    # Exponents without a dot are numbers, as in TOML and YAML 1.2 (PyYAML alone reads `3e-4` as text);
    # a quoted one stays text.
    p.write_text('train:\n  lr: 3e-4\n  weight_decay: 1E-2\n  max_grad_norm: 2.5e+1\nmodel: "3e5"\n')
    cfg = load_config(p)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.max_grad_norm, cfg.model) == (3e-4, 1e-2, 25.0, "3e5")


def test_bad_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    other = tmp_path / "c.json"
    other.write_text("{}")
    with pytest.raises(ConfigError, match="unknown config format"):
        load_config(other)


def test_resolved_toml_round_trips() -> None:
    cfg = load_config(None, ["rounds=4", "lora.types=[[4, 8]]", "aggregator_options={max_rank = 8}",
                             'model="we\\"ird"'])
    again = from_dict(tomllib.loads(to_toml(cfg)))
    assert again == cfg


def test_describe_lists_every_key_with_help() -> None:
    text = describe()
    for key in ("model", "rounds", "train.lr", "lora.alpha", "eval.every", "export.rank"):
        assert f"\n{key} = " in "\n" + text
    assert "Peak learning rate" in text


# -- data and eval keys: what reaches the loaders and the eval set --------------------------

RENAMED = [
    {"uid": "r1", "category": "math", "prompt": "Add the numbers.", "context": "2 + 3", "response": "5"},
    {"uid": "r2", "category": "geo", "prompt": "Name the capital.", "context": "France", "response": "Paris"},
    {"uid": "r3", "category": "math", "prompt": "Multiply.", "context": "3 * 4", "response": "12"},
    {"uid": "r4", "category": "spell", "prompt": "Spell it backwards.", "context": "", "response": "tac"},
]
FIELD_SETS = ["task_field=category", "instruction_field=prompt", "input_field=context", "output_field=response",
              "id_field=uid"]


def _renamed_file(tmp_path) -> str:
    import json

    path = tmp_path / "renamed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RENAMED))
    return str(path)


def _expected_tasks(records: list[dict]) -> dict:
    from flexlora.data import Example

    out: dict = {}
    for r in records:
        out.setdefault(r["category"], []).append(
            Example(id=r["uid"], instruction=r["prompt"], input=r["context"], output=r["response"],
                    task=r["category"]))
    return out


def test_field_keys_default_to_the_generic_loaders() -> None:
    from flexlora.data import JSONL_FIELD_DEFAULTS

    cfg = RunConfig()
    for section in (cfg.data_options, cfg.eval):
        assert {k: getattr(section, k) for k in JSONL_FIELD_DEFAULTS} == JSONL_FIELD_DEFAULTS
    assert cfg.eval.data == ""
    text = describe()
    for key in ("eval.data", *(f"{s}.{k}" for s in ("data_options", "eval") for k in JSONL_FIELD_DEFAULTS)):
        assert f"\n{key} = " in "\n" + text, key


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["data_options.task_fild=x"], "unknown config key 'data_options.task_fild'; did you mean 'task_field'"),
        (["eval.dataa=x"], "unknown config key 'eval.dataa'"),
        (["data_options.instruction_field="], "config key 'data_options.instruction_field': must name"),
        (['eval.output_field=""'], "config key 'eval.output_field': must name"),
        (["data_options.task_field=3"], "config key 'data_options.task_field': must be str"),
        (["data_options.max_per_task=-1"], "config key 'data_options.max_per_task': must be >= 0"),
    ],
)
def test_bad_data_keys_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert needle in str(exc.value)


def test_data_options_field_keys_reach_the_loader(tmp_path) -> None:
    from flexlora.engines.run_setup import load_run_data

    data_file = _renamed_file(tmp_path)
    cfg = load_config(None, [f"data={data_file}", *(f"data_options.{s}" for s in FIELD_SETS)])
    data = load_run_data(cfg)
    assert data.train == _expected_tasks(RENAMED)
    assert data.unseen == {}
    # "" (what `--set data_options.id_field=` gives) means no id field: ids are numbered.
    cfg = load_config(None, [f"data={data_file}", *(f"data_options.{s}" for s in FIELD_SETS[:4]),
                             "data_options.id_field="])
    assert [ex.id for ex in load_run_data(cfg).iter_train()] == ["renamed-1", "renamed-3", "renamed-2", "renamed-4"]


def test_missing_field_error_gives_the_set_fix_that_works(tmp_path) -> None:
    from flexlora.data import DataError
    from flexlora.engines.run_setup import load_run_data

    data_file = _renamed_file(tmp_path)
    with pytest.raises(DataError) as err:
        load_run_data(load_config(None, [f"data={data_file}"]))
    msg = str(err.value)
    assert msg.startswith(f"{data_file}, line 1: missing required fields")
    for key in ("task_field", "instruction_field", "output_field"):
        assert f"--set data_options.{key}=<name>" in msg
    # Applying the suggested overrides (the field names taken from "fields present") loads the file.
    fixed = load_config(None, [f"data={data_file}", "data_options.task_field=category",
                               "data_options.instruction_field=prompt", "data_options.output_field=response"])
    assert list(load_run_data(fixed).train) == ["math", "geo", "spell"]


def test_field_keys_for_a_non_json_data_set_are_rejected() -> None:
    from flexlora.data import DataError
    from flexlora.engines.run_setup import load_run_data

    with pytest.raises(DataError, match="remove data_options.task_field from the config"):
        load_run_data(load_config(None, ["data_options.task_field=category"]))  # builtin:demo-tasks


def test_eval_data_builds_the_eval_set_from_that_file(tmp_path) -> None:
    from pathlib import Path

    from engine_common import TINY

    from flexlora.engines.federation import Federation

    eval_file = _renamed_file(tmp_path)
    eval_sets = [f"eval.data={eval_file}", *(f"eval.{s}" for s in FIELD_SETS)]
    logs: list[str] = []
    fed = Federation(load_config(None, [*TINY, *eval_sets, "eval.max_tasks=0", "eval.max_examples_per_task=0"]),
                     tmp_path / "run", progress=False, log=logs.append)
    expected = _expected_tasks(RENAMED)
    # Every task of the file, sorted as the eval set is, and nothing of the training data's.
    want = [ex for task in sorted(expected) for ex in expected[task]]
    assert fed.eval_examples == want
    assert [(task, refs) for task, _, refs in fed.eval_items] == [(ex.task, (ex.output,)) for ex in want]
    assert len(fed.eval_features) == len(want)
    assert any("evaluating on eval.data" in m for m in logs)
    # The training data is still the run's own.
    assert fed.data.name.startswith("builtin:demo-tasks")

    # The eval limits apply to eval.data too.
    capped = Federation(load_config(None, [*TINY, *eval_sets, "eval.max_tasks=2", "eval.max_examples_per_task=1"]),
                        tmp_path / "capped", progress=False, log=lambda m: None)
    assert capped.eval_examples == [expected["geo"][0], expected["math"][0]]

    # Without eval.data: the training data's held-out tasks, as before.
    default = Federation(load_config(None, TINY), tmp_path / "default", progress=False, log=lambda m: None)
    assert {ex.task for ex in default.eval_examples} <= set(default.data.unseen)
    assert {ex.task for ex in default.eval_examples}.isdisjoint(expected)

    # eval.data is part of the run's identity (a run cannot be resumed with another one): only
    # eval.data differs here, and the other file even has the same content.
    other = tmp_path / "other.jsonl"
    other.write_text(Path(eval_file).read_text())
    moved = Federation(load_config(None, [*TINY, *eval_sets, "eval.max_tasks=0", "eval.max_examples_per_task=0",
                                          f"eval.data={other}"]),
                       tmp_path / "moved", progress=False, log=lambda m: None)
    assert moved.eval_examples == fed.eval_examples
    assert moved.fingerprint != fed.fingerprint


def test_eval_data_on_training_tasks_warns(tmp_path) -> None:
    import json

    from engine_common import TINY

    from flexlora.data import load_demo_tasks
    from flexlora.engines.federation import Federation

    trained = load_demo_tasks().train_tasks[0]
    path = tmp_path / "same.jsonl"
    path.write_text(json.dumps({"task": trained, "instruction": "i", "output": "o"}) + "\n")
    logs: list[str] = []
    Federation(load_config(None, [*TINY, f"eval.data={path}"]), tmp_path / "run", progress=False, log=logs.append)
    assert any("not zero-shot" in m and trained in m for m in logs)


def test_eval_data_errors_name_the_eval_keys(tmp_path) -> None:
    from flexlora.data import DataError
    from flexlora.engines.run_setup import load_run_eval_data

    assert load_run_eval_data(load_config(None, [])) is None
    eval_file = _renamed_file(tmp_path)
    with pytest.raises(DataError) as err:
        load_run_eval_data(load_config(None, [f"eval.data={eval_file}"]))
    assert str(err.value).startswith(eval_file) and "--set eval.task_field=<name>" in str(err.value)
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(DataError) as err:
        load_run_eval_data(load_config(None, [f"eval.data={missing}"]))
    assert str(err.value).startswith(f"{missing}: no such file") and "--set eval.data=<path>" in str(err.value)


def test_eval_data_natural_instructions_test_tasks(tmp_path) -> None:
    from pathlib import Path

    from flexlora.engines.run_setup import load_run_eval_data

    root = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "ni"
    data = load_run_eval_data(load_config(None, [f"eval.data={root}", "eval.max_examples_per_task=1"]))
    assert data is not None and data.train == {}
    assert data.counts()["unseen"] == {"task901_antonyms": 1, "task902_title_generation": 1}


@pytest.mark.parametrize("name,text,needle", [
    ("dup.yaml", "rounds: 1\nrounds: 3\n", "line 2: key 'rounds' is given twice"),
    ("intkey.yaml", "1: x\n", "line 1: key 1 is not a name"),
    ("agg.yaml", "aggregator_options:\n  1: 2\n", "line 2: key 1 is not a name"),
    ("null.yaml", "aggregator_options: {max_rank: null}\n", "config key 'flexlora.max_rank': must be int, got NoneType"),
    ("list.yaml", "- a\n- b\n", "the config must be a table of settings"),
    ("false.yaml", "false\n", "the config must be a table of settings"),
    ("CAPS.TOML", "rounds = 2\n", None),
    ("bom.toml", "\ufeffrounds = 2\n", None),
])
def test_config_files_are_read_strictly(tmp_path, name: str, text: str, needle) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    if needle is None:
        assert load_config(path).rounds == 2
        return
    with pytest.raises(ConfigError) as exc:
        load_config(path, ["seed=1"])  # an override does not hide the file's own problem
    assert needle in str(exc.value)


def test_a_directory_or_non_utf8_file_is_named(tmp_path) -> None:
    (tmp_path / "d.toml").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path / "d.toml")
    (tmp_path / "l.toml").write_bytes("model = 'caf\u00e9'".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(tmp_path / "l.toml")


def test_strings_with_control_characters_round_trip_through_toml() -> None:
    cfg = load_config(None, ['eval.data="line1\\nline2\\t\\"q\\"\\\\x"'])
    assert "\n" in cfg.eval.data and '"' in cfg.eval.data
    assert tomllib.loads(to_toml(cfg))["eval"]["data"] == cfg.eval.data
