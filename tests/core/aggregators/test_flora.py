"""FLoRA (Wang et al.): exact stacking, accumulated over rounds (method.md section 4)."""

from __future__ import annotations

import pytest
import torch

import flexlora.core.aggregators.base as base_mod
from flexlora.core import FLoRA, dense_update

SHAPES = {"q": (22, 18), "down": (12, 30)}


def _round(helpers, gen, specs):
    """specs: (ranks, num_examples, alpha) per client."""
    return [helpers.make_update(gen, SHAPES, r, num_examples=n, alpha=a) for r, n, a in specs]


ROUND1 = [({"q": 2, "down": 3}, 8, 16.0), ({"q": 4, "down": 1}, 2, 8.0), ({"q": 1, "down": 2}, 30, 32.0)]
ROUND2 = [({"q": 3, "down": 2}, 5, 16.0), ({"q": 2, "down": 2}, 9, 4.0), ({"q": 1, "down": 1}, 1, 16.0)]


def test_stacked_product_is_exact_weighted_sum(helpers, gen):
    updates = _round(helpers, gen, ROUND1)
    state = FLoRA().aggregate(updates)
    for m in SHAPES:
        assert state.modules[m].rank == sum(u.rank(m) for u in updates)  # the stack itself
        assert helpers.rel_err(dense_update(state, m), helpers.reference_dense(updates, m)) <= 1e-6


def test_accumulates_rounds_and_partial_participation(helpers, gen):
    agg = FLoRA()
    r1 = _round(helpers, gen, ROUND1)
    r2 = _round(helpers, gen, ROUND2)
    s1 = agg.aggregate(r1)
    s2 = agg.aggregate(r2, previous=s1)
    # round 3: only a subset takes part; its increment is the subset's own weighted mean
    r3 = _round(helpers, gen, ROUND1[:1] + ROUND2[1:2])
    s3 = agg.aggregate(r3, previous=s2)
    assert (s1.round, s2.round, s3.round) == (1, 2, 3)
    for m in SHAPES:
        ref1 = helpers.reference_dense(r1, m)
        ref2 = helpers.reference_dense(r2, m)
        ref3 = helpers.reference_dense(r3, m)  # weights over the two sampled clients only
        assert helpers.rel_err(dense_update(s2, m), ref1 + ref2) <= 1e-6
        assert helpers.rel_err(dense_update(s3, m), ref1 + ref2 + ref3) <= 1e-6
        # weights over the subset: (8, 9) / 17, by hand
        a0, b0 = r3[0].factors[m]
        a1, b1 = r3[1].factors[m]
        by_hand = (8 / 17) * (16.0 / a0.shape[0]) * b0.double() @ a0.double() + (9 / 17) * (
            4.0 / a1.shape[0]
        ) * b1.double() @ a1.double()
        assert helpers.rel_err(dense_update(s3, m) - dense_update(s2, m), by_hand) <= 1e-5


def test_accumulate_false_keeps_only_the_round(helpers, gen):
    agg = FLoRA(accumulate=False)
    r1 = _round(helpers, gen, ROUND1)
    r2 = _round(helpers, gen, ROUND2)
    s2 = agg.aggregate(r2, previous=agg.aggregate(r1))
    for m in SHAPES:
        assert helpers.rel_err(dense_update(s2, m), helpers.reference_dense(r2, m)) <= 1e-6


def test_compression_when_stack_exceeds_min_dim_stays_exact(helpers, gen):
    shapes = {"m": (12, 10)}
    agg = FLoRA()
    state, total = None, torch.zeros(12, 10, dtype=torch.float64)
    for _rnd in range(4):
        ups = [helpers.make_update(gen, shapes, r, num_examples=n, alpha=a)
               for r, n, a in ((4, 3, 16.0), (3, 7, 8.0), (2, 1, 16.0))]
        total += helpers.reference_dense(ups, "m")
        state = agg.aggregate(ups, previous=state)
        # the stack never grows beyond min(out, in) = 10 (9 after round 1, then compressed)
        assert state.modules["m"].rank <= 10
        assert helpers.rel_err(dense_update(state, "m"), total) <= 1e-5
    assert state.modules["m"].rank == 10


@pytest.mark.parametrize("alpha", [16.0, 3.0])
def test_stacked_factors_reproduce_global_exactly(helpers, gen, alpha):
    agg = FLoRA()
    r1 = _round(helpers, gen, ROUND1)
    state = agg.aggregate(_round(helpers, gen, ROUND2), previous=agg.aggregate(r1))
    stacked = agg.stacked(state, alpha)
    for m, (A, B) in stacked.items():
        R = A.shape[0]
        assert B.shape == (SHAPES[m][0], R) and R == state.modules[m].rank
        assert helpers.rel_err((alpha / R) * B.double() @ A.double(), dense_update(state, m)) <= 1e-6


def test_distribute_is_best_rank_r_and_svd_once(helpers, gen, monkeypatch):
    calls = []
    real = base_mod.svd_of_product

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(base_mod, "svd_of_product", counting)
    agg = FLoRA()
    updates = _round(helpers, gen, ROUND1)
    state = agg.aggregate(updates)
    for r in (1, 3, 5, 3):
        out = agg.distribute(state, r, 8.0)
        for m in SHAPES:
            ref = helpers.reference_dense(updates, m)
            eff = helpers.effective(out, 8.0)[m]
            assert float(torch.linalg.norm(ref - eff)) <= helpers.tail_error(ref, r) + 1e-5 * float(torch.linalg.norm(ref))
            assert helpers.rel_err(eff, helpers.best_rank(ref, r)) <= 1e-4
    assert len(calls) == len(SHAPES)  # one SVD per module, whatever the number of ranks


# ---------------------------------------------------------------------------------------- rsLoRA
# Ranks 2..4 and stacks of rank 4..9: sqrt(r) != r everywhere, so ignoring rslora fails.
RS_ROUND1 = [({"q": 2, "down": 3}, 8, 16.0, True), ({"q": 4, "down": 2}, 2, 8.0, False),
             ({"q": 3, "down": 2}, 30, 32.0, True)]
RS_ROUND2 = [({"q": 3, "down": 2}, 5, 16.0, True), ({"q": 2, "down": 4}, 9, 4.0, True)]


def _rs_round(helpers, gen, specs):
    return [helpers.make_update(gen, SHAPES, r, num_examples=n, alpha=a, rslora=rs) for r, n, a, rs in specs]


def _hand_dense(updates, m):
    # sum_k p_k s_k B_k A_k written out here, s_k = alpha_k / sqrt(r_k) for rsLoRA clients.
    total = sum(u.num_examples for u in updates)
    out = 0
    for u in updates:
        a, b = u.factors[m]
        r = a.shape[0]
        s = u.alpha / (r**0.5 if u.rslora else r)
        out = out + (u.num_examples / total) * s * (b.double() @ a.double())
    return out


def test_rslora_stack_accumulates_exactly(helpers, gen):
    agg = FLoRA()
    r1, r2 = _rs_round(helpers, gen, RS_ROUND1), _rs_round(helpers, gen, RS_ROUND2)
    s2 = agg.aggregate(r2, previous=agg.aggregate(r1))
    for m in SHAPES:
        want = _hand_dense(r1, m) + _hand_dense(r2, m)
        assert helpers.rel_err(dense_update(s2, m), want) <= 1e-6


@pytest.mark.parametrize("alpha", [16.0, 3.0])
def test_rslora_stacked_factors_reproduce_global_exactly(helpers, gen, alpha):
    agg = FLoRA()
    state = agg.aggregate(_rs_round(helpers, gen, RS_ROUND2), previous=agg.aggregate(_rs_round(helpers, gen, RS_ROUND1)))
    stacked = agg.stacked(state, alpha, rslora=True)
    plain = agg.stacked(state, alpha)
    for m, (A, B) in stacked.items():
        R = A.shape[0]
        assert R == state.modules[m].rank and R > 1
        assert helpers.rel_err((alpha / R**0.5) * B.double() @ A.double(), dense_update(state, m)) <= 1e-6
        # B is the plain-LoRA B times sqrt(R) / R: the ratio of the two scalings
        torch.testing.assert_close(B, plain[m][1] / R**0.5, rtol=1e-6, atol=1e-7)


def test_rslora_distribute_is_best_rank_r(helpers, gen):
    agg = FLoRA()
    updates = _rs_round(helpers, gen, RS_ROUND1)
    state = agg.aggregate(updates)
    for r in (2, 3, 5):
        out = agg.distribute(state, r, 8.0, rslora=True)
        for m in SHAPES:
            U, S, Vh = torch.linalg.svd(_hand_dense(updates, m), full_matrices=False)
            best = (U[:, :r] * S[:r]) @ Vh[:r]
            eff = (8.0 / r**0.5) * out[m][1].double() @ out[m][0].double()
            assert helpers.rel_err(eff, best) <= 1e-4, (m, r)
