"""Tests for flexlora.training.export: PEFT adapter directories and merged models."""

from __future__ import annotations

import json
import re

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexlora.training.adapter import client_adapter
from flexlora.training.export import atomic_directory_write, save_merged_model, save_peft_adapter
from flexlora.training.models import load_base_model

TINY = "builtin:tiny-llama"
IDS = torch.tensor([[5, 80, 200, 33, 7, 101, 9], [250, 3, 3, 60, 61, 62, 63]])


@pytest.fixture()
def setup(tiny, helpers):
    model, tok = tiny
    ranks = helpers.paper_like_ranks(model, attention=8, mlp=30)
    ranks["model.layers.1.self_attn.o_proj"] = 5  # one odd module
    factors = helpers.random_factors(model, ranks, seed=21, scale=0.2)
    alpha = 11.0
    with client_adapter(model, ranks, alpha, factors) as pm:
        pm.eval()
        with torch.no_grad():
            expected = pm(input_ids=IDS).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, tok, ranks, factors, alpha, expected, state


def _assert_base_unchanged(model, state):
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert not hasattr(model, "peft_config")


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_peft_adapter_loads_with_stock_peft_and_reproduces_logits(setup, tmp_path):
    model, _, ranks, factors, alpha, expected, state = setup
    out = tmp_path / "adapter"
    assert save_peft_adapter(model, factors, alpha, out, base_model_name_or_path=TINY) == out.absolute()
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    _assert_base_unchanged(model, state)

    fresh, _ = load_base_model(TINY)
    loaded = peft.PeftModel.from_pretrained(fresh, str(out))
    loaded.eval()
    with torch.no_grad():
        got = loaded(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The adapter changes the output, so the comparison above is not vacuous.
    with torch.no_grad():
        assert (model(input_ids=IDS).logits - expected).abs().max() > 1e-2


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_rslora_export_round_trip_reproduces_logits_and_delta_weights(setup, tmp_path):
    model, tok, ranks, factors, alpha, plain_expected, state = setup
    with client_adapter(model, ranks, alpha, factors, rslora=True) as pm:
        pm.eval()
        with torch.no_grad():
            expected = pm(input_ids=IDS).logits
    # Guard: rsLoRA changes the output at these ranks (8, 30, 5), so the checks below would fail
    # if the export dropped the flag.
    assert (expected - plain_expected).abs().max() > 1e-3
    out = tmp_path / "adapter"
    save_peft_adapter(model, factors, alpha, out, base_model_name_or_path=TINY, rslora=True)
    _assert_base_unchanged(model, state)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["lora_alpha"] == alpha

    fresh, _ = load_base_model(TINY)
    loaded = peft.PeftModel.from_pretrained(fresh, str(out))
    loaded.eval()
    with torch.no_grad():
        got = loaded(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # Every module's delta weight, as peft computes it, is (alpha / sqrt(r)) B A (written out here).
    inner = loaded.base_model.model
    for name, (a, b) in factors.items():
        delta = inner.get_submodule(name).get_delta_weight("default")
        torch.testing.assert_close(delta, (alpha / ranks[name] ** 0.5) * (b @ a), atol=1e-6, rtol=1e-5)

    # The merged export applies the same scaling.
    merged_dir = tmp_path / "merged"
    save_merged_model(model, tok, factors, alpha, merged_dir, rslora=True)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, expected, atol=1e-5, rtol=0)


def test_plain_export_records_use_rslora_false(setup, tmp_path):
    model, _, _, factors, alpha, _, _ = setup
    save_peft_adapter(model, factors, alpha, tmp_path / "a", base_model_name_or_path=TINY)
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["use_rslora"] is False


def test_adapter_config_keeps_per_module_ranks(setup, tmp_path):
    model, _, ranks, factors, alpha, _, _ = setup
    out = tmp_path / "adapter"
    save_peft_adapter(model, factors, alpha, out, base_model_name_or_path=TINY)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == alpha
    assert cfg["base_model_name_or_path"] == TINY
    # Each module's rank is recoverable from the config by exact name.
    recovered = {}
    for key, r in cfg["rank_pattern"].items():
        hits = [m for m in ranks if re.fullmatch(key, m)]
        assert len(hits) == 1, key
        recovered[hits[0]] = r
    assert recovered == ranks
    assert sorted({8, 30, 5}) == sorted(set(recovered.values()))


def test_merged_model_reproduces_logits_without_touching_the_base(setup, tmp_path):
    model, tok, _, factors, alpha, expected, state = setup
    out = tmp_path / "merged"
    save_merged_model(model, tok, factors, alpha, out)
    _assert_base_unchanged(model, state)
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    merged.eval()
    with torch.no_grad():
        got = merged(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    reloaded_tok = AutoTokenizer.from_pretrained(str(out))
    assert reloaded_tok.encode("hi 北京") == tok.encode("hi 北京")


def test_export_replaces_an_earlier_export_whole_and_refuses_a_foreign_directory(setup, tmp_path):
    model, _, _, factors, alpha, _, _ = setup
    out = tmp_path / "adapter"
    save_peft_adapter(model, factors, alpha, out, base_model_name_or_path=TINY)
    (out / "stale.txt").write_text("old")  # left in an earlier export: replaced with it
    save_peft_adapter(model, factors, alpha, out, base_model_name_or_path=TINY)
    assert not (out / "stale.txt").exists()
    assert (out / "adapter_config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="holds no earlier export"):
        save_peft_adapter(model, factors, alpha, foreign, base_model_name_or_path=TINY)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_failed_write_keeps_the_previous_export(tmp_path):
    out = tmp_path / "export"
    atomic_directory_write(out, lambda d: (d / "a.txt").write_text("v1"))

    def broken(d):
        (d / "a.txt").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_directory_write(out, broken)
    assert (out / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_failed_peft_save_keeps_the_base_clean(setup, tmp_path, monkeypatch):
    model, _, _, factors, alpha, _, state = setup

    def boom(self, *a, **k):
        raise OSError("cannot write")

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", boom)
    with pytest.raises(OSError, match="cannot write"):
        save_peft_adapter(model, factors, alpha, tmp_path / "x", base_model_name_or_path=TINY)
    _assert_base_unchanged(model, state)
    assert list(tmp_path.iterdir()) == []


def test_merged_rejects_factors_that_do_not_fit(setup, tmp_path):
    model, tok, _, factors, alpha, _, _ = setup
    bad = dict(factors)
    a, b = bad["model.layers.0.mlp.up_proj"]
    bad["model.layers.0.mlp.up_proj"] = (a.T.contiguous(), b)
    with pytest.raises(ValueError, match="up_proj"):
        save_merged_model(model, tok, bad, alpha, tmp_path / "m")
