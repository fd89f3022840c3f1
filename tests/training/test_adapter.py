"""Tests for flexlora.training.adapter: per-client ranks, factor I/O, clean detaching."""

from __future__ import annotations

import copy
import gc
import math
import re
import warnings

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from transformers import LlamaConfig, LlamaForCausalLM

from flexlora.training.adapter import (
    attach_adapter,
    client_adapter,
    detach_adapter,
    get_factors,
    linear_shapes,
    live_factors,
    rank_pattern_key,
    set_factors,
    target_modules_spec,
)
from flexlora.training.client import merged_into_base
from flexlora.training.local import LocalTrainConfig, train_local
from flexlora.training.models import model_lora_targets


def _lora_layers(pm):
    return {n: m for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def _snapshot(model):
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "dict_keys": {n: sorted(m.__dict__) for n, m in model.named_modules()},
        "config": model.config.to_dict(),
    }


def _assert_same(before, after):
    assert after["modules"] == before["modules"]
    assert after["params"].keys() == before["params"].keys()
    for n, p in before["params"].items():
        assert torch.equal(after["params"][n], p), n
    for n, b in before["buffers"].items():
        assert torch.equal(after["buffers"][n], b), n
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["dict_keys"] == before["dict_keys"]
    assert after["config"] == before["config"]


# ----------------------------------------------------------------------------- ranks


def test_client_trains_at_its_assigned_rank(tiny, helpers):
    model, _ = tiny
    ranks = helpers.paper_like_ranks(model, attention=8, mlp=200)
    # Independent expectation: MLP ranks capped at min(out, in) = 64 of the tiny model.
    groups = model_lora_targets(model)
    assert {ranks[n] for n, g in groups.items() if g == "mlp"} == {64}
    assert {ranks[n] for n, g in groups.items() if g == "attention"} == {8}
    alpha = 16.0
    torch.manual_seed(0)
    with client_adapter(model, ranks, alpha) as pm:
        layers = _lora_layers(pm)
        assert set(layers) == set(ranks)
        for name, layer in layers.items():
            lin = layer.base_layer
            assert layer.lora_A["default"].weight.shape == (ranks[name], lin.in_features)
            assert layer.lora_B["default"].weight.shape == (lin.out_features, ranks[name])
            assert layer.scaling["default"] == pytest.approx(alpha / ranks[name])
        before = get_factors(pm)
        cfg = LocalTrainConfig(optimizer="adamw", lr=1e-2, micro_batch_size=2, local_steps=3, max_grad_norm=0.0)
        train_local(pm, helpers.make_features(4), cfg, seed=0)
        after = get_factors(pm)
    assert {n: a.shape[0] for n, (a, _) in after.items()} == ranks
    assert {n: b.shape[1] for n, (_, b) in after.items()} == ranks
    for name in ranks:
        assert not torch.equal(before[name][0], after[name][0]), name
        assert not torch.equal(before[name][1], after[name][1]), name
        assert after[name][0].dtype == torch.float32


def test_scaling_uses_each_modules_own_rank_and_the_clients_alpha(tiny_model):
    names = list(model_lora_targets(tiny_model))
    ranks = {n: 1 + i % 5 for i, n in enumerate(names)}
    pm = attach_adapter(tiny_model, ranks, 7.0)
    try:
        for name, layer in _lora_layers(pm).items():
            assert layer.r["default"] == ranks[name]
            assert layer.scaling["default"] == pytest.approx(7.0 / ranks[name])
    finally:
        detach_adapter(pm)


def test_lora_linear_output_equals_hand_computed_update(tiny, helpers):
    model, _ = tiny
    ranks = helpers.paper_like_ranks(model, attention=8, mlp=30)
    factors = helpers.random_factors(model, ranks, seed=3)
    alpha = 16.0
    name = "model.layers.1.mlp.gate_proj"
    w = model.get_submodule(name).weight.detach().clone()
    x = torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(1))
    with client_adapter(model, ranks, alpha, factors) as pm:
        pm.eval()
        got = pm.base_model.model.get_submodule(name)(x)
    a, b = factors[name]
    expected = x @ w.T + (alpha / ranks[name]) * (x @ a.T) @ b.T
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_model_output_equals_base_with_updated_weights(tiny, helpers):
    model, _ = tiny
    ranks = helpers.paper_like_ranks(model, attention=8, mlp=30)
    factors = helpers.random_factors(model, ranks, seed=4)
    alpha = 12.0
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, (a, b) in factors.items():
            reference.get_submodule(name).weight += (alpha / a.shape[0]) * b @ a
    ids = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    with client_adapter(model, ranks, alpha, factors) as pm:
        pm.eval()
        got = pm(input_ids=ids).logits
    torch.testing.assert_close(got, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_rslora_scaling_and_output_equal_hand_computed_update(tiny, helpers):
    model, _ = tiny
    ranks = helpers.paper_like_ranks(model, attention=8, mlp=30)
    ranks["model.layers.1.self_attn.o_proj"] = 5
    factors = helpers.random_factors(model, ranks, seed=3)
    alpha = 16.0
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, (a, b) in factors.items():
            reference.get_submodule(name).weight += (alpha / math.sqrt(a.shape[0])) * b @ a
    ids = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    with client_adapter(model, ranks, alpha, factors, rslora=True) as pm:
        pm.eval()
        assert pm.peft_config["default"].use_rslora is True
        for name, layer in _lora_layers(pm).items():
            assert layer.scaling["default"] == pytest.approx(alpha / math.sqrt(ranks[name]), rel=1e-12)
        got = pm(input_ids=ids).logits
    torch.testing.assert_close(got, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    # Guard: the plain scaling gives a different output on these ranks (8, 30, 5).
    with client_adapter(model, ranks, alpha, factors) as pm:
        pm.eval()
        assert (pm(input_ids=ids).logits - got).abs().max() > 1e-3
    with pytest.raises(ValueError, match="rslora"):
        attach_adapter(model, ranks, alpha, rslora="yes")  # type: ignore[arg-type]


def test_merged_into_base_uses_the_rslora_scaling(tiny, helpers):
    model, _ = tiny
    ranks = {"model.layers.0.self_attn.q_proj": 6, "model.layers.1.mlp.down_proj": 9}
    delta = helpers.random_factors(model, ranks, seed=8)
    before = {m: model.get_submodule(m).weight.detach().clone() for m in ranks}
    with merged_into_base(model, delta, 12.0, rslora=True):
        for m, (a, b) in delta.items():
            want = before[m] + (12.0 / math.sqrt(a.shape[0])) * b @ a
            torch.testing.assert_close(model.get_submodule(m).weight, want, atol=1e-6, rtol=1e-6)
    for m in ranks:
        assert torch.equal(model.get_submodule(m).weight, before[m])  # restored bit for bit


def test_fresh_adapter_is_seeded_and_starts_at_zero_update(tiny_model):
    ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.mlp.up_proj": 6}
    out = []
    for _ in range(2):
        torch.manual_seed(123)
        with client_adapter(tiny_model, ranks, 16.0) as pm:
            out.append(get_factors(pm))
    for name in ranks:
        torch.testing.assert_close(out[0][name][0], out[1][name][0], rtol=0, atol=0)
        assert out[0][name][0].abs().sum() > 0
        assert torch.count_nonzero(out[0][name][1]) == 0


# ----------------------------------------------------------------------------- name matching


def test_rank_pattern_key_matches_exactly_one_name():
    key = rank_pattern_key("model.layers.1.self_attn.q_proj")
    others = [
        "model.layers.11.self_attn.q_proj",
        "model.layers.10.self_attn.q_proj",
        "vision.model.layers.1.self_attn.q_proj",
        "modelXlayersX1Xself_attnXq_proj",
        "model.layers.1.self_attn.q_proj.lora_A",
    ]
    # peft's own matching function: the key must resolve only for the exact name.
    assert get_pattern_key([key], "model.layers.1.self_attn.q_proj") == key
    for name in others:
        assert get_pattern_key([key], name) != key, name
    # An unescaped, unanchored name (what naive code would pass) does over-match.
    naive = "model.layers.1.self_attn.q_proj"
    assert get_pattern_key([naive], "vision.model.layers.1.self_attn.q_proj") == naive


def test_target_modules_spec_falls_back_to_full_match_regex_when_a_list_would_over_match():
    targets = ["model.layers.0.mlp.up_proj"]
    flat = ["model", "model.layers.0.mlp", "model.layers.0.mlp.up_proj", "lm_head"]
    assert target_modules_spec(targets, flat) == targets
    nested = flat + ["vision.model.layers.0.mlp.up_proj"]
    spec = target_modules_spec(targets, nested)
    assert isinstance(spec, str)
    cfg = peft.LoraConfig(target_modules=spec, r=2)
    hits = [n for n in nested if check_target_module_exists(cfg, n)]
    assert hits == ["model.layers.0.mlp.up_proj"]
    # The plain list would also have hit the nested module.
    list_cfg = peft.LoraConfig(target_modules=targets, r=2)
    assert check_target_module_exists(list_cfg, "vision.model.layers.0.mlp.up_proj")


def test_per_module_ranks_on_a_twelve_layer_model():
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=12,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    # Layer i gets rank 1 + i % 8 (layers 1 and 11 differ: 2 vs 4) on q_proj and up_proj.
    ranks = {}
    for i in range(12):
        ranks[f"model.layers.{i}.self_attn.q_proj"] = 1 + i % 8
        ranks[f"model.layers.{i}.mlp.up_proj"] = 1 + (i * 3) % 8
    pm = attach_adapter(model, ranks, 16.0)
    try:
        got = {n: layer.r["default"] for n, layer in _lora_layers(pm).items()}
    finally:
        detach_adapter(pm)
    assert got == ranks
    assert got["model.layers.1.self_attn.q_proj"] == 2 and got["model.layers.11.self_attn.q_proj"] == 4


# ----------------------------------------------------------------------------- factor I/O


def test_set_then_get_factors_round_trips(tiny, helpers):
    model, _ = tiny
    ranks = helpers.paper_like_ranks(model, attention=5, mlp=9)
    factors = helpers.random_factors(model, ranks, seed=7)
    with client_adapter(model, ranks, 16.0) as pm:
        set_factors(pm, factors)
        got = get_factors(pm)
        live = live_factors(pm)
        assert all(a.requires_grad and b.requires_grad for a, b in live.values())
    assert got.keys() == factors.keys()
    for name, (a, b) in factors.items():
        assert torch.equal(got[name][0], a) and torch.equal(got[name][1], b)
        assert got[name][0].data_ptr() != live[name][0].data_ptr()  # a copy, not the parameter


@pytest.mark.parametrize("which", ["A", "B"])
def test_set_factors_rejects_wrong_shapes_naming_the_module(tiny, helpers, which):
    model, _ = tiny
    ranks = helpers.paper_like_ranks(model, attention=4, mlp=4)
    factors = helpers.random_factors(model, ranks)
    bad = "model.layers.1.self_attn.v_proj"
    a, b = factors[bad]
    factors[bad] = (a[:3], b) if which == "A" else (a, b[:, :3])
    with client_adapter(model, ranks, 16.0) as pm:
        with pytest.raises(ValueError, match=re.escape(bad)) as err:
            set_factors(pm, factors)
    assert f"factor {which}" in str(err.value)


def test_set_factors_rejects_missing_and_unknown_modules(tiny, helpers):
    model, _ = tiny
    ranks = helpers.paper_like_ranks(model, attention=4, mlp=4)
    factors = helpers.random_factors(model, ranks)
    with client_adapter(model, ranks, 16.0) as pm:
        partial = dict(factors)
        partial.pop("model.layers.0.mlp.down_proj")
        with pytest.raises(ValueError, match="lack modules.*down_proj"):
            set_factors(pm, partial)
        extra = dict(factors)
        extra["model.layers.9.mlp.down_proj"] = factors["model.layers.0.mlp.down_proj"]
        with pytest.raises(ValueError, match="layers.9"):
            set_factors(pm, extra)


@pytest.mark.parametrize(
    ("ranks", "match"),
    [
        ({"model.layers.0.self_attn.k_proj": 33}, "exceeds min"),
        ({"model.layers.0.self_attn.k_proj": 0}, "positive int"),
        ({"model.layers.7.self_attn.k_proj": 2}, "no module"),
        ({"model.layers.0.input_layernorm": 2}, "not an nn.Linear"),
        ({}, "empty"),
    ],
)
def test_attach_validates_ranks(tiny_model, ranks, match):
    before = _snapshot(tiny_model)
    with pytest.raises(ValueError, match=match):
        attach_adapter(tiny_model, ranks, 16.0)
    _assert_same(before, _snapshot(tiny_model))


def test_attach_refuses_a_base_that_still_carries_an_adapter(tiny_model):
    ranks = {"model.layers.0.self_attn.q_proj": 2}
    pm = attach_adapter(tiny_model, ranks, 16.0)
    try:
        with pytest.raises(RuntimeError, match="already carries"):
            attach_adapter(tiny_model, ranks, 16.0)
    finally:
        detach_adapter(pm)


# ----------------------------------------------------------------------------- detaching


def test_detach_restores_the_base_exactly(tiny, helpers):
    model, _ = tiny
    model.eval()
    before = _snapshot(model)
    ranks = helpers.paper_like_ranks(model)
    pm = attach_adapter(model, ranks, 16.0, dropout=0.1)
    set_factors(pm, helpers.random_factors(model, ranks))
    train_local(pm, helpers.make_features(3), LocalTrainConfig(lr=1e-2, local_steps=2, micro_batch_size=2), seed=0)
    base = detach_adapter(pm)
    assert base is model
    assert not hasattr(model, "peft_config")
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    _assert_same(before, _snapshot(model))


def test_client_adapter_detaches_on_exception(tiny_model):
    before = _snapshot(tiny_model)
    with pytest.raises(KeyError, match="boom"):
        with client_adapter(tiny_model, {"model.layers.0.mlp.up_proj": 3}, 16.0):
            raise KeyError("boom")
    _assert_same(before, _snapshot(tiny_model))


def test_client_adapter_detaches_when_set_factors_fails(tiny_model):
    before = _snapshot(tiny_model)
    bad = {"model.layers.0.mlp.up_proj": (torch.zeros(2, 64), torch.zeros(128, 2))}
    with pytest.raises(ValueError, match="up_proj"):
        with client_adapter(tiny_model, {"model.layers.0.mlp.up_proj": 3}, 16.0, bad):
            pass
    _assert_same(before, _snapshot(tiny_model))


def _live_tensor_count() -> int:
    gc.collect()
    with warnings.catch_warnings():
        # isinstance() touches deprecated module-level aliases among gc's objects.
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_thirty_attach_train_detach_cycles_do_not_grow(tiny, helpers):
    model, _ = tiny
    before = _snapshot(model)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters())) + len(list(model.buffers()))
    feats = helpers.make_features(2)
    cfg = LocalTrainConfig(lr=1e-2, local_steps=1, micro_batch_size=2)
    small = helpers.paper_like_ranks(model, attention=2, mlp=4)
    big = helpers.paper_like_ranks(model, attention=30, mlp=64)
    counts = []
    for cycle in range(30):
        ranks = small if cycle % 2 else big
        with client_adapter(model, ranks, 16.0, helpers.random_factors(model, ranks, seed=cycle)) as pm:
            train_local(pm, feats, cfg, seed=cycle)
            get_factors(pm)
        del pm
        if cycle in (9, 29):
            counts.append(_live_tensor_count())
        assert sum(p.numel() for p in model.parameters()) == n_params
        assert len(list(model.parameters())) + len(list(model.buffers())) == n_tensors
    assert counts[1] <= counts[0], f"live tensors grew from {counts[0]} to {counts[1]} over 20 cycles"
    _assert_same(before, _snapshot(model))


def test_linear_shapes_reads_out_and_in_and_names_bad_modules(tiny_model):
    q = tiny_model.get_submodule("model.layers.0.self_attn.q_proj")
    up = tiny_model.get_submodule("model.layers.1.mlp.up_proj")
    shapes = linear_shapes(tiny_model, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"])
    assert shapes == {"model.layers.0.self_attn.q_proj": tuple(q.weight.shape),
                      "model.layers.1.mlp.up_proj": tuple(up.weight.shape)}
    with pytest.raises(ValueError, match="layers.7.*no module"):
        linear_shapes(tiny_model, ["model.layers.7.mlp.up_proj"])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        linear_shapes(tiny_model, ["model.layers.0.input_layernorm"])


def test_a_sparse_task_naming_a_missing_module_is_a_clear_error(tiny):
    from flexlora.data.examples import Example
    from flexlora.methods import ClientContext, SLoRA
    from flexlora.training.client import ClientSpec, ClientTask, EncodingOptions

    model, tok = tiny
    before = _snapshot(model)
    spec = ClientSpec("c0", {"model.layers.0.self_attn.q_proj": 2}, 16.0, "t")
    # SLoRA's stage-1 task: the mask size per module and the mask seed (no global change yet).
    task = ClientTask(round=1, client=0, spec=spec, seed=0,
                      meta={"stage": 1, "counts": {"model.layers.9.self_attn.q_proj": 4}, "mask_seed": 0})
    ex = [Example(id="e0", instruction="Say hi.", input="", output="hi", task="t")]
    ctx = ClientContext(model, tok, ex, LocalTrainConfig(local_steps=1), EncodingOptions())
    with pytest.raises(ValueError, match="layers.9.*no module"):
        SLoRA.client_train(ctx, task)
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merged_into_base_rounds_a_half_precision_sum_once(dtype):
    # A small update on half-precision weights: the merged weight is the float32 sum rounded once
    # (the nearest representable value), not the update rounded and then the sum rounded again.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False)).to(dtype)
    a, b = torch.randn(4, 64), torch.randn(48, 4) * 1e-3
    w0 = model[0].weight.detach().clone()
    want = (w0.float() + (16.0 / 4) * (b @ a)).to(dtype)
    twice = w0 + ((16.0 / 4) * (b @ a)).to(dtype)
    assert not torch.equal(want, twice)  # the two roundings differ on this data
    with merged_into_base(model, {"0": (a, b)}, 16.0):
        assert torch.equal(model[0].weight, want)
    assert torch.equal(model[0].weight, w0)


def test_merged_sparse_change_rounds_a_bf16_sum_once():
    from flexlora.core.sparse import dense_change
    from flexlora.training.sparse import merged_sparse_change

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48, bias=False)).to(torch.bfloat16)
    shapes = {"0": (48, 64)}
    change = {"0": torch.randn(300) * 1e-3}
    w0 = model[0].weight.detach().clone()
    d = dense_change("0", shapes["0"], change["0"], 5)
    assert int((d != 0).sum()) == 300  # the change sits on its mask
    want = (w0.float() + d).to(torch.bfloat16)
    with merged_sparse_change(model, change, shapes, 5):
        assert torch.equal(model[0].weight, want)
    assert torch.equal(model[0].weight, w0)
