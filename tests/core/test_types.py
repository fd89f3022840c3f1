"""Validation of client updates and rank requests, the aggregator registry, and the global state's
checkpoint round trip. Every bad input must name the client and the module."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from flexlora.core import (
    AggregationError,
    ClientUpdate,
    GlobalState,
    available_aggregators,
    averages_factors,
    dense_update,
    get_aggregator,
)
from flexlora.core.types import check_rank_request, client_weights, lora_scaling, validate_round

MOD = "model.layers.3.mlp.up_proj"
OTHER = "model.layers.3.self_attn.q_proj"
SHAPES = {OTHER: (12, 10), MOD: (9, 14)}
ALL = available_aggregators()


def _good_round(helpers, gen, n=3, rank=2):
    return [helpers.make_update(gen, SHAPES, rank, num_examples=5 + i, alpha=16.0) for i in range(n)]


def _replace(update, module=None, pair=None, **kw):
    factors = dict(update.factors)
    if module is not None:
        if pair is None:
            del factors[module]
        else:
            factors[module] = pair
    fields = {"num_examples": update.num_examples, "alpha": update.alpha, "client_id": update.client_id}
    fields.update(kw)
    return ClientUpdate(factors, **fields)


def test_client_update_accessors(gen, helpers):
    u = helpers.make_update(gen, SHAPES, {OTHER: 3, MOD: 5}, alpha=10.0, client_id="bob")
    assert u.rank(OTHER) == 3 and u.rank(MOD) == 5
    assert u.scale(MOD) == pytest.approx(10.0 / 5)
    assert u.label(4) == "client 4 ('bob')"


def test_lora_scaling_plain_and_rslora(gen, helpers):
    # The numbers: at alpha 16, rank 200 is scaled by 0.08 and rank 8 by 2 (plain LoRA).
    assert lora_scaling(16.0, 200) == 0.08 and lora_scaling(16, 8) == 2.0
    assert lora_scaling(16.0, 200, rslora=True) == pytest.approx(16.0 / math.sqrt(200))
    assert lora_scaling(16.0, 8, rslora=True) == pytest.approx(16.0 / math.sqrt(8))
    assert lora_scaling(3.0, 1, rslora=True) == lora_scaling(3.0, 1) == 3.0
    u = helpers.make_update(gen, SHAPES, {OTHER: 3, MOD: 5}, alpha=10.0, rslora=True)
    assert u.scale(MOD) == pytest.approx(10.0 / math.sqrt(5)) and u.scale(OTHER) == pytest.approx(10.0 / math.sqrt(3))
    # Plain LoRA keeps the exact float it always had (alpha / r), not a rounding-different variant.
    for alpha, r in ((16.0, 3), (7.5, 200), (11.0, 30)):
        assert lora_scaling(alpha, r) == alpha / r


def test_validate_round_returns_shapes_and_weights(gen, helpers):
    updates = _good_round(helpers, gen)
    assert validate_round(updates) == SHAPES
    w = client_weights(updates)
    assert w.dtype == torch.float64
    torch.testing.assert_close(w, torch.tensor([5, 6, 7], dtype=torch.float64) / 18)


def test_numpy_scalars_accepted(gen, helpers):
    # sizes and alphas often come from numpy arrays (partition sizes, configs)
    updates = _good_round(helpers, gen)
    updates[1] = _replace(updates[1], num_examples=np.int64(6), alpha=np.float32(16.0))
    for name in ("flexlora", "hetlora", "flora", "fedavg"):
        get_aggregator(name).aggregate(updates)
    torch.testing.assert_close(client_weights(updates), torch.tensor([5, 6, 7], dtype=torch.float64) / 18)


def _bad_rounds(helpers, gen):
    """(case id, round, substrings the message must contain). The bad client is client 1."""
    base = _good_round(helpers, gen)
    a, b = base[1].factors[MOD]
    cases = []

    def add(cid, bad_update, *needles):
        rnd = list(base)
        rnd[1] = bad_update
        cases.append((cid, rnd, needles))

    add("rank-mismatch", _replace(base[1], MOD, (a, torch.randn(9, 3))), "client 1", MOD, "ranks differ")
    add("swapped-factors", _replace(base[1], MOD, (b, a)), "client 1", MOD)
    add("not-2d", _replace(base[1], MOD, (a.flatten(), b)), "client 1", MOD, "2-D")
    add("not-a-pair", _replace(base[1], MOD, (a, b, b)), "client 1", MOD, "pair")
    add("not-tensors", _replace(base[1], MOD, (a.tolist(), b)), "client 1", MOD, "torch tensors")
    add("missing-module", _replace(base[1], MOD), "client 1", MOD, "missing")
    add("extra-module", _replace(base[1], "model.layers.9.mlp.down_proj", (a, b)), "client 1",
        "model.layers.9.mlp.down_proj", "extra")
    add("shape-differs", _replace(base[1], MOD, (torch.randn(2, 15), b)), "client 1", MOD, "differs")
    nan_a = a.clone()
    nan_a[0, 3] = float("nan")
    add("nan", _replace(base[1], MOD, (nan_a, b)), "client 1", MOD, "NaN")
    inf_b = b.clone()
    inf_b[4, 1] = float("-inf")
    add("inf", _replace(base[1], MOD, (a, inf_b)), "client 1", MOD, "factor B")
    add("rank-above-min", _replace(base[1], MOD, (torch.randn(10, 14), torch.randn(9, 10))), "client 1", MOD,
        "rank 10", "min(out, in) = 9")
    add("rank-zero", _replace(base[1], MOD, (torch.randn(0, 14), torch.randn(9, 0))), "client 1", MOD, "rank 0")
    for n in (0, -3, 2.5, True, "7", float("nan"), float("inf")):
        add(f"num_examples={n!r}", _replace(base[1], num_examples=n), "client 1", "num_examples")
    for alpha in (0.0, -16.0, float("nan"), float("inf")):
        add(f"alpha={alpha!r}", _replace(base[1], alpha=alpha), "client 1", "alpha")
    for rslora in ("false", 1, None):
        add(f"rslora={rslora!r}", _replace(base[1], rslora=rslora), "client 1", "rslora")
    add("not-an-update", {"factors": base[1].factors}, "client 1", "ClientUpdate")
    add("no-modules", ClientUpdate({}, num_examples=3), "client 1", "no modules")
    add("client-id", _replace(base[1], MOD, (nan_a, b), client_id="site-7"), "client 1 ('site-7')", MOD)
    return cases


@pytest.mark.parametrize("name", ALL)
def test_bad_updates_rejected_naming_client_and_module(helpers, gen, name):
    for cid, rnd, needles in _bad_rounds(helpers, gen):
        with pytest.raises(AggregationError) as exc:
            get_aggregator(name).aggregate(rnd)
        msg = str(exc.value)
        for needle in needles:
            assert needle in msg, f"{name}/{cid}: {needle!r} not in {msg!r}"
        assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize("name", ALL)
def test_empty_round_rejected(name):
    with pytest.raises(AggregationError, match="empty round"):
        get_aggregator(name).aggregate([])


def test_check_finite_false_skips_the_scan(helpers, gen):
    updates = _good_round(helpers, gen)
    a, b = updates[1].factors[MOD]
    a = a.clone()
    a[0, 0] = float("nan")
    updates[1] = _replace(updates[1], MOD, (a, b))
    validate_round(updates, check_finite=False)  # no error
    with pytest.raises(AggregationError):
        validate_round(updates)


def test_large_finite_values_are_not_taken_for_inf(helpers, gen):
    # The fast path sums the tensor; an overflowing sum of finite values must not be reported as
    # NaN/Inf. Such values are refused, but for their size (their products overflow float32).
    updates = _good_round(helpers, gen)
    a, b = updates[1].factors[MOD]
    big = torch.full_like(a, 3e38)
    updates[1] = _replace(updates[1], MOD, (big, b))
    with pytest.raises(AggregationError) as exc:
        validate_round(updates)
    assert "too large to aggregate in float32" in str(exc.value) and "NaN" not in str(exc.value)
    validate_round(updates, check_finite=False)


@pytest.mark.parametrize("name", ALL)
def test_update_norm_bound_is_exact_and_names_the_client(helpers, gen, name):
    """The bound is (alpha/r) ||B||_F ||A||_F <= MAX_UPDATE_NORM: scale one client's A so the
    bound lands just under it (accepted) and just over it (refused, naming client and module)."""
    from flexlora.core.types import MAX_UPDATE_NORM

    updates = _good_round(helpers, gen)
    u = updates[1]
    a, b = u.factors[MOD]
    unit = u.scale(MOD) * float(a.double().norm()) * float(b.double().norm())
    for factor, ok in ((0.99, True), (1.01, False)):
        k = factor * MAX_UPDATE_NORM / unit
        updates[1] = _replace(u, MOD, ((a.double() * k).float(), b))
        if ok:
            validate_round(updates)
        else:
            with pytest.raises(AggregationError, match=rf"client 1, module '{MOD}': the update is too large"):
                get_aggregator(name).aggregate(updates)


def test_nonfinite_modules_names_the_bad_module(helpers, gen):
    agg = get_aggregator("flexlora")
    state = agg.aggregate(_good_round(helpers, gen))
    assert state.nonfinite_modules() == []
    state.modules[MOD].svd.S[0] = float("inf")
    assert state.nonfinite_modules() == [MOD]
    factored = get_aggregator("fedavg").aggregate(_good_round(helpers, gen))  # A/B representation
    assert factored.nonfinite_modules() == []
    factored.modules[OTHER].B[0, 0] = float("nan")
    assert factored.nonfinite_modules() == [OTHER]


@pytest.mark.parametrize("name", ALL)
def test_bad_rank_requests_rejected(helpers, gen, name):
    agg = get_aggregator(name)
    state = agg.aggregate(_good_round(helpers, gen))
    with pytest.raises(AggregationError, match=r"module 'model\.layers\.3\.mlp\.up_proj': requested rank 10 exceeds"):
        agg.distribute(state, {OTHER: 2, MOD: 10})
    with pytest.raises(AggregationError, match="exceeds min"):
        agg.distribute(state, 11)  # above 12 x 10's min for OTHER too
    with pytest.raises(AggregationError, match="lacks modules"):
        agg.distribute(state, {OTHER: 2})
    with pytest.raises(AggregationError, match="does not hold"):
        agg.distribute(state, {OTHER: 2, MOD: 2, "lm_head": 2})
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(AggregationError, match="positive int"):
            agg.distribute(state, bad)
    for alpha in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(AggregationError, match="alpha"):
            agg.distribute(state, 2, alpha)


def test_check_rank_request_resolves():
    assert check_rank_request(3, SHAPES) == {OTHER: 3, MOD: 3}
    assert check_rank_request({MOD: 9, OTHER: 1}, SHAPES) == {OTHER: 1, MOD: 9}


def test_registry():
    assert ALL == ["fedavg", "fedit", "flexlora", "flora", "hetlora"]
    assert type(get_aggregator(" FlexLoRA ")).__name__ == "FlexLoRA"
    with pytest.raises(AggregationError, match="unknown aggregator 'fedprox'") as exc:
        get_aggregator("fedprox")
    for known in ALL:
        assert known in str(exc.value)
    with pytest.raises(AggregationError, match="aggregator 'flexlora' has no setting 'max_rnak'") as exc:
        get_aggregator("flexlora", max_rnak=3)
    assert "max_rank" in str(exc.value).split("its settings are")[1]  # the fix is named
    # The list is the class's own keyword settings (FedAvg has one; HetLoRA's weighting is not its).
    with pytest.raises(AggregationError, match="has no setting 'weighting'; its settings are check_finite, clip_norm$"):
        get_aggregator("fedavg", weighting="norm")
    assert get_aggregator("flexlora", max_rank=3).max_rank == 3


@pytest.mark.parametrize("name", ALL)
def test_averages_factors_says_which_aggregators_see_the_factorisation(gen, name):
    # Two clients send the same product B A, factored differently (A, B) and (2A, B/2). An
    # aggregator of products returns that product; one that averages A and B separately returns
    # mean(B, B/2) mean(A, 2A) = 1.125 B A (HetLoRA's norm weights change the factor, not that it differs).
    a = torch.randn(3, 14, generator=gen, dtype=torch.float64)
    b = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    ups = [ClientUpdate({MOD: (a, b)}, num_examples=4, alpha=3.0, client_id="one"),
           ClientUpdate({MOD: (2 * a, b / 2)}, num_examples=4, alpha=3.0, client_id="two")]
    got = dense_update(get_aggregator(name).aggregate(ups), MOD).double()
    exact = torch.allclose(got, b @ a, rtol=1e-5, atol=1e-6)
    assert averages_factors(name) == (not exact)
    assert averages_factors(f" {name.upper()} ") == averages_factors(name)
    with pytest.raises(AggregationError, match="unknown aggregator 'fedprox'"):
        averages_factors("fedprox")


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip(helpers, gen, name):
    agg = get_aggregator(name)
    ranks = 2 if name in ("fedavg", "fedit") else None
    updates = [
        helpers.make_update(gen, SHAPES, ranks or {OTHER: 1 + i, MOD: 3 - i}, num_examples=4 + i, alpha=16.0)
        for i in range(3)
    ]
    state = agg.aggregate(updates)
    state = agg.aggregate(updates, previous=state)
    before = {r: agg.distribute(state, r, 8.0) for r in ([2] if ranks else [1, 2, 5])}
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    restored = GlobalState.from_state_dict(torch.load(buf, weights_only=True))
    assert restored.aggregator == state.aggregator and restored.round == state.round == 2
    assert restored.extra == state.extra and restored.shapes == state.shapes
    for m in SHAPES:
        torch.testing.assert_close(dense_update(restored, m), dense_update(state, m))
    fresh = get_aggregator(name)
    for r, factors in before.items():
        again = fresh.distribute(restored, r, 8.0)
        for m in SHAPES:
            torch.testing.assert_close(again[m][0], factors[m][0])
            torch.testing.assert_close(again[m][1], factors[m][1])


def _sd(helpers, gen, name):
    agg = get_aggregator(name)
    return agg.aggregate(_good_round(helpers, gen)).state_dict()


@pytest.mark.parametrize(
    "name,corrupt",
    [
        ("flexlora", lambda sd: sd.pop("modules")),
        ("flexlora", lambda sd: sd.pop("round")),
        ("flexlora", lambda sd: sd["modules"][MOD].pop("tensors")),
        ("flexlora", lambda sd: sd["modules"][MOD]["tensors"].pop("S")),
        ("flexlora", lambda sd: sd["modules"][MOD].__setitem__("shape", [9, 15])),
        ("flexlora", lambda sd: sd["modules"][MOD]["tensors"].__setitem__("S", torch.ones(5))),
        ("flexlora", lambda sd: sd["modules"][MOD]["tensors"].__setitem__("V", torch.ones(14, 1))),
        ("flexlora", lambda sd: sd["modules"][MOD]["tensors"].__setitem__("U", [[1.0]])),
        ("hetlora", lambda sd: sd["modules"][MOD]["tensors"].__setitem__("A", torch.ones(3, 14))),
        ("hetlora", lambda sd: sd["modules"][MOD]["tensors"].__setitem__("B", torch.ones(8, 2))),
        ("hetlora", lambda sd: sd["modules"][MOD].pop("scale")),
        ("fedavg", lambda sd: sd["modules"][MOD].__setitem__("shape", [9])),
    ],
)
def test_malformed_state_dict_rejected(helpers, gen, name, corrupt):
    sd = _sd(helpers, gen, name)
    corrupt(sd)
    with pytest.raises(ValueError):
        GlobalState.from_state_dict(sd)


def test_malformed_state_dict_not_a_mapping():
    with pytest.raises(ValueError, match="malformed"):
        GlobalState.from_state_dict([1, 2, 3])  # type: ignore[arg-type]


def test_dense_of_unknown_module(helpers, gen):
    state = get_aggregator("flexlora").aggregate(_good_round(helpers, gen))
    with pytest.raises(KeyError, match="lm_head"):
        state.dense("lm_head")
    assert math.isfinite(float(state.dense(MOD).sum()))
