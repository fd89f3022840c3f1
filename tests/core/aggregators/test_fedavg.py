"""FedAvg / FedIT: factor-wise weighted averaging of homogeneous LoRA adapters (method.md section 4)."""

from __future__ import annotations

import pytest
import torch

from flexlora.core import AggregationError, ClientUpdate, FedAvg, dense_update, get_aggregator

SHAPES = {"layers.0.self_attn.q_proj": (18, 14), "layers.0.mlp.down_proj": (10, 22)}
RANKS = {"layers.0.self_attn.q_proj": 4, "layers.0.mlp.down_proj": 6}


def _homo_round(helpers, gen, ns=(4, 10, 6), alpha=16.0):
    return [helpers.make_update(gen, SHAPES, RANKS, num_examples=n, alpha=alpha) for n in ns]


def test_factorwise_weighted_mean_by_hand(helpers, gen):
    updates = _homo_round(helpers, gen, ns=(4, 10, 6))
    state = FedAvg().aggregate(updates)
    for m, r in RANKS.items():
        # p = (4, 10, 6) / 20
        A_bar = (4 * updates[0].factors[m][0].double() + 10 * updates[1].factors[m][0].double()
                 + 6 * updates[2].factors[m][0].double()) / 20
        B_bar = (4 * updates[0].factors[m][1].double() + 10 * updates[1].factors[m][1].double()
                 + 6 * updates[2].factors[m][1].double()) / 20
        st = state.modules[m]
        torch.testing.assert_close(st.A.double(), A_bar, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st.B.double(), B_bar, rtol=1e-6, atol=1e-6)
        assert st.scale == pytest.approx(16.0 / r)
        torch.testing.assert_close(dense_update(state, m).double(), (16.0 / r) * B_bar @ A_bar, rtol=1e-5, atol=1e-5)
        # the product of averages is not the average of products (the inexactness FlexLoRA removes)
        assert helpers.rel_err(dense_update(state, m), helpers.reference_dense(updates, m)) > 1e-2
        A, B = FedAvg().distribute(state, RANKS, 16.0)[m]
        torch.testing.assert_close(A.double(), A_bar, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(B.double(), B_bar, rtol=1e-6, atol=1e-6)
    assert state.extra["alpha"] == 16.0


def test_fedit_is_the_same_server_rule(helpers, gen):
    updates = _homo_round(helpers, gen)
    a = FedAvg().aggregate(updates)
    b = get_aggregator("fedit").aggregate(updates)
    for m in SHAPES:
        torch.testing.assert_close(a.modules[m].A, b.modules[m].A)
        torch.testing.assert_close(a.modules[m].B, b.modules[m].B)


def test_mixed_ranks_refused_naming_module(helpers, gen):
    updates = _homo_round(helpers, gen)
    bad = dict(RANKS)
    bad["layers.0.mlp.down_proj"] = 3
    updates[1] = helpers.make_update(gen, SHAPES, bad, num_examples=5)
    with pytest.raises(AggregationError) as exc:
        FedAvg().aggregate(updates)
    msg = str(exc.value)
    assert "layers.0.mlp.down_proj" in msg and "client 1" in msg and "mixed ranks" in msg
    assert "layers.0.self_attn.q_proj" not in msg


def test_different_alphas_refused(helpers, gen):
    updates = _homo_round(helpers, gen)
    u = updates[2]
    updates[2] = ClientUpdate(u.factors, num_examples=u.num_examples, alpha=8.0)
    with pytest.raises(AggregationError, match="alpha"):
        FedAvg().aggregate(updates)


@pytest.mark.parametrize("alpha", [8.0, 16.0, 40.0])
def test_distribute_with_other_alpha_keeps_effective_update(helpers, gen, alpha):
    updates = _homo_round(helpers, gen)
    agg = FedAvg()
    state = agg.aggregate(updates)
    factors = agg.distribute(state, RANKS, alpha)
    for m, r in RANKS.items():
        A, B = factors[m]
        assert A.shape == (r, SHAPES[m][1]) and B.shape == (SHAPES[m][0], r)
        torch.testing.assert_close(A, state.modules[m].A)
        # B absorbs 16 / alpha so that (alpha / r) B A = (16 / r) B_bar A_bar
        torch.testing.assert_close(B, state.modules[m].B * (16.0 / alpha), rtol=1e-6, atol=1e-7)
        assert helpers.rel_err(helpers.effective(factors, alpha)[m], dense_update(state, m)) <= 1e-6


def test_distribute_other_rank_refused(helpers, gen):
    updates = _homo_round(helpers, gen)
    agg = FedAvg()
    state = agg.aggregate(updates)
    with pytest.raises(AggregationError, match="layers.0.self_attn.q_proj"):
        agg.distribute(state, {"layers.0.self_attn.q_proj": 3, "layers.0.mlp.down_proj": 6})


def test_single_client_is_returned_unchanged(helpers, gen):
    u = helpers.make_update(gen, SHAPES, RANKS, num_examples=7, alpha=4.0)
    agg = FedAvg()
    state = agg.aggregate([u])
    out = agg.distribute(state, RANKS, 4.0)
    for m in SHAPES:
        torch.testing.assert_close(out[m][0], u.factors[m][0])
        torch.testing.assert_close(out[m][1], u.factors[m][1])


# ---------------------------------------------------------------------------------------- rsLoRA


def test_rslora_factorwise_mean_and_scale_by_hand(helpers, gen):
    updates = [helpers.make_update(gen, SHAPES, RANKS, num_examples=n, alpha=16.0, rslora=True) for n in (4, 10, 6)]
    agg = FedAvg()
    state = agg.aggregate(updates)
    assert state.extra == {"alpha": 16.0, "rslora": True}
    for m, r in RANKS.items():  # ranks 4 and 6: sqrt(r) != r
        A_bar = sum(n * u.factors[m][0].double() for n, u in zip((4, 10, 6), updates)) / 20
        B_bar = sum(n * u.factors[m][1].double() for n, u in zip((4, 10, 6), updates)) / 20
        assert state.modules[m].scale == pytest.approx(16.0 / r**0.5)
        want = (16.0 / r**0.5) * B_bar @ A_bar
        torch.testing.assert_close(dense_update(state, m).double(), want, rtol=1e-5, atol=1e-5)
        # an rsLoRA receiver of the same alpha gets the averaged factors back unchanged
        A, B = agg.distribute(state, RANKS, 16.0, rslora=True)[m]
        torch.testing.assert_close(A.double(), A_bar, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(B.double(), B_bar, rtol=1e-6, atol=1e-6)
    # a plain-LoRA receiver gets B rescaled so that its (alpha / r) B A is the same update
    plain = agg.distribute(state, RANKS, 8.0)
    for m in RANKS:
        assert helpers.rel_err(helpers.effective(plain, 8.0)[m], dense_update(state, m)) <= 1e-6
    # plain-LoRA states keep exactly the contents they had before rsLoRA existed
    assert FedAvg().aggregate(_homo_round(helpers, gen)).extra == {"alpha": 16.0}


def test_rslora_mixed_with_plain_refused(helpers, gen):
    updates = _homo_round(helpers, gen)
    u = updates[1]
    updates[1] = ClientUpdate(u.factors, num_examples=u.num_examples, alpha=u.alpha, rslora=True)
    with pytest.raises(AggregationError, match="rslora"):
        FedAvg().aggregate(updates)
