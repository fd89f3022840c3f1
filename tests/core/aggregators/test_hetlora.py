"""HetLoRA (Cho et al.): zero-padding, norm weights, truncation, rank self-pruning (method.md section 4)."""

from __future__ import annotations

import math

import pytest
import torch

from flexlora.core import AggregationError, HetLoRA, dense_update, pruned_ranks, rank_pruning_penalty

SHAPES = {"q": (16, 12), "up": (20, 9)}


def _hetero_round(helpers, gen):
    return [
        helpers.make_update(gen, SHAPES, {"q": 2, "up": 6}, num_examples=5, alpha=16.0, scale=0.5),
        helpers.make_update(gen, SHAPES, {"q": 5, "up": 1}, num_examples=20, alpha=8.0, scale=2.0),
        helpers.make_update(gen, SHAPES, {"q": 3, "up": 4}, num_examples=12, alpha=32.0),
    ]


def _hand_aggregate(updates, module, weights_of):
    """Zero-pad (alpha_k/r_k) B_k and A_k to the largest rank, and average with ``weights_of``."""
    r_max = max(u.factors[module][0].shape[0] for u in updates)
    out_f, in_f = SHAPES[module]
    w = weights_of(updates, module)
    A = torch.zeros(r_max, in_f, dtype=torch.float64)
    B = torch.zeros(out_f, r_max, dtype=torch.float64)
    for wk, u in zip(w, updates):
        a, b = u.factors[module]
        r = a.shape[0]
        A[:r] += wk * a.double()
        B[:, :r] += wk * (u.alpha / r) * b.double()
    return A, B


def _norm_weights(updates, module):
    norms = [float(torch.linalg.norm((u.alpha / u.factors[module][0].shape[0])
                                     * u.factors[module][1].double() @ u.factors[module][0].double()))
             for u in updates]
    return [n / sum(norms) for n in norms]


def _size_weights(updates, module):
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def _norm_size_weights(updates, module):
    raw = [n * u.num_examples for n, u in zip(_norm_weights(updates, module), updates)]
    return [x / sum(raw) for x in raw]


@pytest.mark.parametrize(
    "weighting,weights_of",
    [("norm", _norm_weights), ("size", _size_weights), ("norm_size", _norm_size_weights)],
)
def test_zero_padding_and_weights_by_hand(helpers, gen, weighting, weights_of):
    updates = _hetero_round(helpers, gen)
    state = HetLoRA(weighting=weighting).aggregate(updates)
    for m in SHAPES:
        A, B = _hand_aggregate(updates, m, weights_of)
        st = state.modules[m]
        assert st.A.shape == A.shape and st.B.shape == B.shape
        torch.testing.assert_close(st.A.double(), A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.B.double(), B, rtol=1e-5, atol=1e-6)
        assert st.scale == 1.0
        torch.testing.assert_close(dense_update(state, m).double(), B @ A, rtol=1e-5, atol=1e-5)


def test_norm_weights_differ_from_size_weights(helpers, gen):
    # guard that the test above distinguishes the weightings on this round
    updates = _hetero_round(helpers, gen)
    for m in SHAPES:
        assert max(abs(a - b) for a, b in zip(_norm_weights(updates, m), _size_weights(updates, m))) > 0.05


def test_all_zero_updates_fall_back_to_size_weights(helpers, gen):
    updates = _hetero_round(helpers, gen)
    for u in updates:
        u.factors = {m: (a, torch.zeros_like(b)) for m, (a, b) in u.factors.items()}
    state = HetLoRA().aggregate(updates)
    for m in SHAPES:
        A, _ = _hand_aggregate(updates, m, _size_weights)
        torch.testing.assert_close(state.modules[m].A.double(), A, rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(state.modules[m].B) == 0


@pytest.mark.parametrize("alpha", [16.0, 4.0])
def test_distribute_truncates_first_ranks_rescaled(helpers, gen, alpha):
    updates = _hetero_round(helpers, gen)
    agg = HetLoRA()
    state = agg.aggregate(updates)
    ranks = {"q": 3, "up": 2}
    out = agg.distribute(state, ranks, alpha)
    for m, r in ranks.items():
        A, B = out[m]
        Ag, Bg = state.modules[m].A, state.modules[m].B
        torch.testing.assert_close(A, Ag[:r])
        torch.testing.assert_close(B, Bg[:, :r] * (r / alpha))
        # effective update: the first r ranks of the padded global product
        eff = helpers.effective(out, alpha)[m]
        torch.testing.assert_close(eff, Bg[:, :r].double() @ Ag[:r].double(), rtol=1e-5, atol=1e-6)


def test_distribute_beyond_padded_rank(helpers, gen):
    updates = _hetero_round(helpers, gen)
    agg = HetLoRA()
    state = agg.aggregate(updates)
    A, B = agg.distribute(state, {"q": 8, "up": 6}, 16.0)["q"]  # padded rank of q is 5
    assert A.shape == (8, 12) and B.shape == (16, 8)
    assert torch.count_nonzero(B[:, 5:]) == 0
    pad = A[5:].double()
    torch.testing.assert_close(pad @ pad.T, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    eff = (16.0 / 8) * B.double() @ A.double()
    torch.testing.assert_close(eff, dense_update(state, "q").double(), rtol=1e-5, atol=1e-6)


def test_unknown_weighting_refused():
    with pytest.raises(AggregationError, match="weighting"):
        HetLoRA(weighting="median")


def _factors(gen, r=10, out_f=7, in_f=6):
    A = torch.randn(r, in_f, generator=gen, dtype=torch.float64).requires_grad_()
    B = torch.randn(out_f, r, generator=gen, dtype=torch.float64).requires_grad_()
    return A, B


@pytest.mark.parametrize("gamma,t", [(0.99, 9), (0.5, 5), (0.75, 7)])  # t = floor(gamma * 10)
def test_rank_pruning_penalty_value_and_gradient(gen, gamma, t):
    A, B = _factors(gen)
    A2, B2 = _factors(gen, r=4, out_f=5, in_f=3)
    t2 = max(1, math.floor(gamma * 4))
    strength = 0.3
    pen = rank_pruning_penalty({"a": (A, B), "b": (A2, B2)}, gamma=gamma, strength=strength)
    with torch.no_grad():
        expected = strength * (
            torch.linalg.norm(B[:, t:]) * torch.linalg.norm(A[t:])
            + torch.linalg.norm(B2[:, t2:]) * torch.linalg.norm(A2[t2:])
        )
    assert pen.ndim == 0
    torch.testing.assert_close(pen.detach(), expected)
    pen.backward()
    # head: no gradient; tail: the analytic gradient of strength * ||B_t|| ||A_t||
    assert torch.count_nonzero(A.grad[:t]) == 0 and torch.count_nonzero(B.grad[:, :t]) == 0
    with torch.no_grad():
        nA, nB = torch.linalg.norm(A[t:]), torch.linalg.norm(B[:, t:])
        torch.testing.assert_close(A.grad[t:], strength * nB * A[t:] / nA)
        torch.testing.assert_close(B.grad[:, t:], strength * nA * B[:, t:] / nB)
    assert float(torch.linalg.norm(A.grad[t:])) > 0 and float(torch.linalg.norm(B.grad[:, t:])) > 0


def test_rank_pruning_penalty_drives_tail_down(gen):
    # a few steps of gradient descent on the penalty alone shrink the tail and leave the head
    A, B = _factors(gen, r=8)
    head_A, head_B = A[:4].detach().clone(), B[:, :4].detach().clone()
    opt = torch.optim.SGD([A, B], lr=0.05)
    before = float(rank_pruning_penalty({"m": (A, B)}, gamma=0.5).detach())
    for _ in range(20):
        opt.zero_grad()
        rank_pruning_penalty({"m": (A, B)}, gamma=0.5).backward()
        opt.step()
    assert float(rank_pruning_penalty({"m": (A, B)}, gamma=0.5).detach()) < 0.5 * before
    torch.testing.assert_close(A[:4].detach(), head_A)
    torch.testing.assert_close(B[:, :4].detach(), head_B)


def test_rank_pruning_penalty_bad_arguments(gen):
    A, B = _factors(gen)
    with pytest.raises(ValueError, match="gamma"):
        rank_pruning_penalty({"m": (A, B)}, gamma=0.0)
    with pytest.raises(ValueError, match="gamma"):
        rank_pruning_penalty({"m": (A, B)}, gamma=1.5)
    with pytest.raises(ValueError):
        rank_pruning_penalty({})


def test_pruned_ranks_decisions(gen):
    A, B = _factors(gen, r=10)
    with torch.no_grad():
        A_small, B_small = A.clone(), B.clone()
        A_small[9:] *= 1e-3
        B_small[:, 9:] *= 1e-3  # tail share ~ 1e-6 * ||.|| / ||.|| << 1e-3
    one_A, one_B = _factors(gen, r=1)
    out = pruned_ranks({"big": (A, B), "small": (A_small, B_small), "one": (one_A, one_B)}, gamma=0.9, threshold=1e-3)
    # t = floor(0.9 * 10) = 9: the tail is row/column 9
    assert out == {"big": 10, "small": 9, "one": 1}
    # the decision follows the hand ratio ||B_t|| ||A_t|| / (||B|| ||A||) against the threshold
    with torch.no_grad():
        ratio = float(torch.linalg.norm(B[:, 9:]) * torch.linalg.norm(A[9:]) / (torch.linalg.norm(B) * torch.linalg.norm(A)))
    assert pruned_ranks({"m": (A, B)}, gamma=0.9, threshold=ratio * 1.01) == {"m": 9}
    assert pruned_ranks({"m": (A, B)}, gamma=0.9, threshold=ratio * 0.99) == {"m": 10}
    # an all-zero update is not pruned (no information to decide on)
    z = torch.zeros(10, 6)
    assert pruned_ranks({"m": (z, torch.zeros(7, 10))}, gamma=0.9) == {"m": 10}


# ---------------------------------------------------------------------------------------- rsLoRA


def _rslora_round(helpers, gen):
    # Ranks 2..6 (sqrt(r) != r); the first client uses plain LoRA, so the round is mixed.
    return [
        helpers.make_update(gen, SHAPES, {"q": 2, "up": 6}, num_examples=5, alpha=16.0, scale=0.5),
        helpers.make_update(gen, SHAPES, {"q": 5, "up": 3}, num_examples=20, alpha=8.0, scale=2.0, rslora=True),
        helpers.make_update(gen, SHAPES, {"q": 3, "up": 4}, num_examples=12, alpha=32.0, rslora=True),
    ]


def _hand_scale(u, r):
    # Written out independently of flexlora.core: alpha / sqrt(r) for rsLoRA, alpha / r otherwise.
    return u.alpha / (math.sqrt(r) if u.rslora else r)


def test_rslora_zero_padding_and_norm_weights_by_hand(helpers, gen):
    updates = _rslora_round(helpers, gen)
    state = HetLoRA().aggregate(updates)
    for m in SHAPES:
        out_f, in_f = SHAPES[m]
        r_max = max(u.factors[m][0].shape[0] for u in updates)
        norms = [float(torch.linalg.norm(_hand_scale(u, u.factors[m][0].shape[0])
                                         * u.factors[m][1].double() @ u.factors[m][0].double())) for u in updates]
        w = [n / sum(norms) for n in norms]
        A = torch.zeros(r_max, in_f, dtype=torch.float64)
        B = torch.zeros(out_f, r_max, dtype=torch.float64)
        plain_B = torch.zeros(out_f, r_max, dtype=torch.float64)
        for wk, u in zip(w, updates):
            a, b = u.factors[m]
            r = a.shape[0]
            A[:r] += wk * a.double()
            B[:, :r] += wk * _hand_scale(u, r) * b.double()
            plain_B[:, :r] += wk * (u.alpha / r) * b.double()
        st = state.modules[m]
        torch.testing.assert_close(st.A.double(), A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.B.double(), B, rtol=1e-5, atol=1e-6)
        # Guard: folding alpha / r instead would give a visibly different B.
        assert float(torch.linalg.norm(plain_B - B)) > 0.1 * float(torch.linalg.norm(B))


@pytest.mark.parametrize("alpha", [16.0, 4.0])
def test_rslora_distribute_truncates_first_ranks_rescaled(helpers, gen, alpha):
    updates = _rslora_round(helpers, gen)
    agg = HetLoRA()
    state = agg.aggregate(updates)
    ranks = {"q": 3, "up": 2}
    out = agg.distribute(state, ranks, alpha, rslora=True)
    for m, r in ranks.items():
        A, B = out[m]
        Ag, Bg = state.modules[m].A, state.modules[m].B
        torch.testing.assert_close(A, Ag[:r])
        torch.testing.assert_close(B, Bg[:, :r] * (math.sqrt(r) / alpha))
        # the receiver's (alpha / sqrt(r)) B A is the first r ranks of the padded global product
        eff = helpers.effective(out, alpha, rslora=True)[m]
        torch.testing.assert_close(eff, Bg[:, :r].double() @ Ag[:r].double(), rtol=1e-5, atol=1e-6)
