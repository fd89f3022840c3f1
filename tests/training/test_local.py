"""Tests for flexlora.training.local and flexlora.training.batching."""

from __future__ import annotations

import math

import pytest
import torch

from flexlora.core.aggregators.hetlora import rank_pruning_penalty
from flexlora.training.adapter import client_adapter, get_factors, live_factors
from flexlora.training.batching import collate_for_training, example_order, micro_batches
from flexlora.training.evaluate import eval_loss
from flexlora.training.local import LocalTrainConfig, lr_multiplier, train_local

# ----------------------------------------------------------------------------- batching


def test_collate_right_pads_and_masks_labels():
    feats = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "attention_mask": [1]},
    ]
    b = collate_for_training(feats, pad_token_id=99)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 99, 99]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in b.values())


def test_collate_rejects_inconsistent_features():
    with pytest.raises(ValueError, match="same length"):
        collate_for_training([{"input_ids": [1, 2], "labels": [1]}], 0)
    with pytest.raises(ValueError, match="at least one"):
        collate_for_training([], 0)
    with pytest.raises(ValueError, match="empty input_ids"):
        collate_for_training([{"input_ids": []}], 0)


def test_example_order_is_seeded_passes_of_permutations():
    order = list(example_order(5, 12, seed=3))
    assert len(order) == 12
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    assert order == list(example_order(5, 12, seed=3))
    assert order != list(example_order(5, 12, seed=4))
    state = torch.get_rng_state()
    list(example_order(5, 12, seed=3))
    assert torch.equal(state, torch.get_rng_state())
    assert [len(b) for b in micro_batches(5, 12, 4, seed=0)] == [4, 4, 4]
    assert [len(b) for b in micro_batches(5, 5, 2, seed=0)] == [2, 2, 1]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "adam"}, "optimizer must be one of"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
        ({"optimizer": "sgd", "momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"optimizer": "adamw", "momentum": 0.9}, "applies to optimizer='sgd' only"),
        ({"micro_batch_size": 0}, "micro_batch_size must be >= 1"),
        ({"grad_accum_steps": 0}, "grad_accum_steps must be >= 1"),
        ({"local_steps": -1}, "local_steps must be >= 0"),
        ({"local_steps": 0, "epochs": 0.0}, "epochs must be > 0"),
        ({"max_grad_norm": -0.1}, "max_grad_norm must be >= 0"),
        ({"lr_scheduler": "step"}, "lr_scheduler must be one of"),
        ({"warmup_steps": -2}, "warmup_steps must be >= 0"),
        ({"micro_batch_size": 2.5}, "micro_batch_size must be an int"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalTrainConfig(**kwargs)


def test_config_fields_carry_help():
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(LocalTrainConfig))


def test_step_counts_in_epoch_and_step_modes():
    cfg = LocalTrainConfig(micro_batch_size=4, epochs=1.0)
    assert (cfg.total_examples(10), cfg.num_steps(10)) == (10, 3)
    cfg = LocalTrainConfig(micro_batch_size=2, grad_accum_steps=2, epochs=0.5)
    assert (cfg.total_examples(10), cfg.num_steps(10)) == (5, 2)
    cfg = LocalTrainConfig(micro_batch_size=2, grad_accum_steps=3, local_steps=4, epochs=0.0)
    assert (cfg.total_examples(10), cfg.num_steps(10)) == (24, 4)


def test_train_local_reports_examples_tokens_and_steps(tiny, helpers):
    model, _ = tiny
    feats = helpers.make_features(5)
    ranks = helpers.paper_like_ranks(model, 4, 4)
    cfg = LocalTrainConfig(micro_batch_size=2, epochs=1.0, lr=1e-3)
    seen = []
    with client_adapter(model, ranks, 16.0) as pm:
        res = train_local(pm, feats, cfg, seed=0, on_step=lambda s, loss: seen.append((s, loss)))
    assert res.steps == 3 and res.examples == 5
    assert res.tokens == sum(len(f["input_ids"]) for f in feats)
    assert [s for s, _ in seen] == [1, 2, 3]
    assert res.losses == [x for _, x in seen]
    assert res.mean_loss == pytest.approx(sum(res.losses) / 3)
    assert res.seconds > 0


# ----------------------------------------------------------------------------- gradients


def _one_sgd_step(model, helpers, feats, ranks, factors, *, micro, accum, lr=1.0):
    cfg = LocalTrainConfig(
        optimizer="sgd", lr=lr, micro_batch_size=micro, grad_accum_steps=accum, local_steps=1, max_grad_norm=0.0
    )
    with client_adapter(model, ranks, 16.0, factors) as pm:
        train_local(pm, feats, cfg, seed=11)
        return get_factors(pm)


def test_gradient_accumulation_equals_one_big_batch(tiny, helpers):
    model, _ = tiny
    # Lengths and prompt masks vary, so a mean of micro-batch means would weight tokens unequally.
    feats = helpers.make_features(4, seed=5, min_len=4, max_len=14, prompt_len=3)
    ranks = helpers.paper_like_ranks(model, 4, 6)
    factors = helpers.random_factors(model, ranks, seed=2)
    big = _one_sgd_step(model, helpers, feats, ranks, factors, micro=4, accum=1)
    small = _one_sgd_step(model, helpers, feats, ranks, factors, micro=1, accum=4)
    mixed = _one_sgd_step(model, helpers, feats, ranks, factors, micro=2, accum=2)

    # Independent reference: the gradient of transformers' own token-mean loss on the full batch.
    with client_adapter(model, ranks, 16.0, factors) as pm:
        batch = collate_for_training(feats, 0)
        pm(**batch).loss.backward()
        grads = {n: (a.grad.clone(), b.grad.clone()) for n, (a, b) in live_factors(pm).items()}
    for name, (a0, b0) in factors.items():
        expected_a, expected_b = a0 - grads[name][0], b0 - grads[name][1]
        for got in (big, small, mixed):
            torch.testing.assert_close(got[name][0], expected_a, atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(got[name][1], expected_b, atol=2e-6, rtol=1e-5)
        assert not torch.allclose(big[name][1], b0)


def test_grad_clipping_caps_the_update_norm(tiny, helpers):
    model, _ = tiny
    feats = helpers.make_features(4)
    ranks = helpers.paper_like_ranks(model, 4, 4)
    factors = helpers.random_factors(model, ranks, seed=1)

    def update_norm(max_norm):
        cfg = LocalTrainConfig(optimizer="sgd", lr=1.0, micro_batch_size=4, local_steps=1, max_grad_norm=max_norm)
        with client_adapter(model, ranks, 16.0, factors) as pm:
            train_local(pm, feats, cfg, seed=0)
            new = get_factors(pm)
        sq = sum(((new[n][i] - factors[n][i]) ** 2).sum() for n in factors for i in (0, 1))
        return float(sq.sqrt())

    unclipped = update_norm(0.0)
    assert unclipped > 0.01
    assert update_norm(1e-3) == pytest.approx(1e-3, rel=1e-3)


def test_regularizer_gradient_reaches_the_tail_of_the_factors(tiny, helpers):
    model, _ = tiny
    # No target tokens: the loss is the regularizer alone.
    feats = [{"input_ids": [1, 2, 3, 4], "labels": [-100] * 4}]
    ranks = {"model.layers.0.self_attn.q_proj": 8, "model.layers.1.mlp.down_proj": 8}
    factors = helpers.random_factors(model, ranks, seed=9)
    cfg = LocalTrainConfig(optimizer="sgd", lr=0.1, micro_batch_size=1, local_steps=3, max_grad_norm=0.0)

    def reg(pm):
        return rank_pruning_penalty(live_factors(pm), gamma=0.5, strength=1.0)

    with client_adapter(model, ranks, 16.0, factors) as pm:
        res = train_local(pm, feats, cfg, seed=0, regularizer=reg)
        new = get_factors(pm)
    assert res.mean_regularizer > 0 and math.isnan(res.mean_loss)
    for name, (a0, b0) in factors.items():
        a1, b1 = new[name]
        # Tail ranks 4..7 are penalised and must shrink; the head 0..3 must not move.
        assert a1[4:].norm() < a0[4:].norm() and b1[:, 4:].norm() < b0[:, 4:].norm()
        assert torch.equal(a1[:4], a0[:4]) and torch.equal(b1[:, :4], b0[:, :4])


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("sched", "step", "total", "warmup", "expected"),
    [
        ("constant", 5, 10, 0, 1.0),
        ("constant", 0, 10, 3, 1 / 4),
        ("constant", 2, 10, 3, 3 / 4),
        ("linear", 0, 10, 0, 1.0),
        ("linear", 5, 10, 0, 0.5),
        ("linear", 9, 10, 0, 0.1),
        ("linear", 4, 10, 2, 1 - 2 / 8),
        ("cosine", 0, 10, 0, 1.0),
        ("cosine", 5, 10, 0, 0.5),
        ("cosine", 3, 12, 0, 0.5 * (1 + math.cos(math.pi * 3 / 12))),
        ("cosine", 6, 10, 2, 0.5 * (1 + math.cos(math.pi * 4 / 8))),
    ],
)
def test_lr_multiplier_closed_form(sched, step, total, warmup, expected):
    assert lr_multiplier(step, total, sched, warmup) == pytest.approx(expected)


@pytest.mark.parametrize("sched", ["linear", "cosine"])
def test_train_local_applies_the_schedule(tiny, sched):
    model, _ = tiny
    name = "model.layers.0.mlp.up_proj"
    ranks = {name: 2}
    factors = {name: (torch.zeros(2, 64), torch.zeros(128, 2))}
    feats = [{"input_ids": [1, 2, 3], "labels": [-100] * 3}]
    lr, steps, warmup = 0.5, 6, 2
    cfg = LocalTrainConfig(
        optimizer="sgd", lr=lr, micro_batch_size=1, local_steps=steps, max_grad_norm=0.0,
        lr_scheduler=sched, warmup_steps=warmup,
    )  # fmt: skip
    values = []
    with client_adapter(model, ranks, 16.0, factors) as pm:
        a_param = live_factors(pm)[name][0]
        # d(sum A)/dA = 1 everywhere, so each SGD step moves A[0, 0] by exactly -lr_t.
        train_local(pm, feats, cfg, seed=0, regularizer=lambda m: live_factors(m)[name][0].sum(),
                    on_step=lambda s, loss: values.append(float(a_param.detach()[0, 0])))  # fmt: skip
    deltas = [-(b - a) for a, b in zip([0.0] + values[:-1], values, strict=True)]
    if sched == "linear":
        expected = [lr * m for m in (1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25)]
    else:
        expected = [lr * m for m in (1 / 3, 2 / 3)] + [
            lr * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)
        ]
    assert deltas == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize(("optimizer", "lr"), [("adamw", 2e-2), ("sgd", 1.0)])
def test_optimizers_reduce_loss_on_a_memorisation_task(tiny, helpers, optimizer, lr):
    model, _ = tiny
    feats = helpers.make_features(4, seed=1, min_len=8, max_len=8, prompt_len=1)
    ranks = helpers.paper_like_ranks(model, 8, 8)
    cfg = LocalTrainConfig(optimizer=optimizer, lr=lr, micro_batch_size=4, local_steps=25, max_grad_norm=1.0)
    torch.manual_seed(0)
    with client_adapter(model, ranks, 16.0) as pm:
        start = eval_loss(pm, feats, batch_size=4)
        res = train_local(pm, feats, cfg, seed=0)
        end = eval_loss(pm, feats, batch_size=4)
    assert end < start - 0.5, (optimizer, start, end)
    assert res.losses[-1] < res.losses[0]


def _run(model, helpers, seed, *, dropout=0.1):
    feats = helpers.make_features(6, seed=2)
    ranks = helpers.paper_like_ranks(model, 4, 4)
    cfg = LocalTrainConfig(lr=1e-2, micro_batch_size=2, local_steps=4)
    torch.manual_seed(seed)  # adapter initialisation, as the client seeds it
    with client_adapter(model, ranks, 16.0, dropout=dropout) as pm:
        res = train_local(pm, feats, cfg, seed=seed)
        return get_factors(pm), res.losses


def test_training_is_deterministic_for_a_seed_and_isolated_from_global_rng(tiny, helpers):
    model, _ = tiny
    f1, l1 = _run(model, helpers, 7)
    torch.manual_seed(999)  # a different global RNG state must not matter
    f2, l2 = _run(model, helpers, 7)
    assert l1 == l2
    for name in f1:
        assert torch.equal(f1[name][0], f2[name][0]) and torch.equal(f1[name][1], f2[name][1])
    f3, l3 = _run(model, helpers, 8)
    assert l3 != l1
    assert any(not torch.equal(f1[n][1], f3[n][1]) for n in f1)
    # train_local itself leaves the global RNG where it was (dropout ran on a forked stream).
    torch.manual_seed(5)
    ranks = helpers.paper_like_ranks(model, 4, 4)
    with client_adapter(model, ranks, 16.0, dropout=0.5) as pm:
        before = torch.get_rng_state()
        train_local(pm, helpers.make_features(2), LocalTrainConfig(local_steps=2, micro_batch_size=1), seed=1)
        assert torch.equal(before, torch.get_rng_state())


def test_dropout_is_seeded_by_the_training_seed(tiny, helpers):
    model, _ = tiny
    feats = helpers.make_features(2)
    ranks = helpers.paper_like_ranks(model, 4, 4)
    factors = helpers.random_factors(model, ranks, seed=0)
    cfg = LocalTrainConfig(optimizer="sgd", lr=0.1, micro_batch_size=2, local_steps=1, max_grad_norm=0.0)
    out = []
    for seed in (1, 1, 2):
        with client_adapter(model, ranks, 16.0, factors, dropout=0.5) as pm:
            out.append(train_local(pm, feats, cfg, seed=seed).losses[0])
    assert out[0] == out[1] and out[0] != out[2]


def test_only_lora_factors_change_and_mode_is_restored(tiny, helpers):
    model, _ = tiny
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    ranks = helpers.paper_like_ranks(model, 4, 4)
    with client_adapter(model, ranks, 16.0) as pm:
        pm.eval()
        train_local(pm, helpers.make_features(3), LocalTrainConfig(lr=1e-1, local_steps=2, micro_batch_size=3), seed=0)
        assert not pm.training
        assert all(p.grad is None for p in pm.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, base[n]), n


def test_train_local_rejects_empty_features(tiny, helpers):
    model, _ = tiny
    with client_adapter(model, {"model.layers.0.mlp.up_proj": 2}, 16.0) as pm:
        with pytest.raises(ValueError, match="at least one training feature"):
            train_local(pm, [], LocalTrainConfig(), seed=0)
