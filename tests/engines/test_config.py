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
