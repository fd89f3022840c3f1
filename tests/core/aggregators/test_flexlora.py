"""FlexLoRA against a naive float64 reference: dense sum of the clients' products, full SVD,
truncation (method.md section 2)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexlora.core.aggregators.base as base_mod
import flexlora.core.aggregators.flexlora as flexlora_mod
import flexlora.core.lowrank as lowrank_mod
from flexlora.core import AggregationError, ClientUpdate, FlexLoRA, dense_update, get_aggregator

F32_RTOL = 1e-5


def _assert_matches_reference(helpers, updates, state, factors, ranks, alpha, *, rtol, rslora=False):
    for m, (A, B) in factors.items():
        r = ranks[m]
        out_f, in_f = state.shapes[m]
        assert A.shape == (r, in_f) and B.shape == (out_f, r)
        ref = helpers.reference_dense(updates, m)
        ref_norm = float(torch.linalg.norm(ref))
        eff = helpers.effective({m: (A, B)}, alpha, rslora=rslora)[m]
        # Eckart-Young: the error of the distributed update is the optimum, whatever the gap.
        err = float(torch.linalg.norm(ref - eff))
        assert err <= helpers.tail_error(ref, r) + rtol * ref_norm, m
        # Equality with the reference truncation; its conditioning is sigma_1 / gap (Wedin), so the
        # float32 tolerance widens only when sigma_r and sigma_{r+1} (nearly) coincide: a backward
        # error of c eps32 ||M|| (eps32 = 6e-8; c about 9 was the worst seen, at gap 0.043) moves the
        # truncation by about c eps32 / gap, and 1e-6 / gap allows c up to 17.
        gap = helpers.relative_gap(ref, r)
        if gap > 1e-4:
            tol = max(rtol, 1e-6 / gap)
            assert helpers.rel_err(eff, helpers.best_rank(ref, r)) <= tol, (m, gap)
        # The kept singular values match the reference's (Weyl: gap-independent).
        S = state.modules[m].svd.S.double()
        S_ref = torch.linalg.svdvals(ref)[: S.shape[0]]
        assert torch.allclose(S, S_ref, rtol=0, atol=rtol * float(S_ref[0]) + 1e-30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_distribute_matches_naive_reference_property(helpers, data):
    updates, shapes = helpers.draw_round(data)
    agg = FlexLoRA()
    state = agg.aggregate(updates)
    # The full-rank state is the weighted average of products itself.
    for m in shapes:
        ref = helpers.reference_dense(updates, m)
        assert helpers.rel_err(dense_update(state, m), ref) <= F32_RTOL
    alpha = data.draw(st.sampled_from([16.0, 1.0, 7.5, 64.0]), label="recv_alpha")
    if data.draw(st.booleans(), label="per_module"):
        ranks = {m: data.draw(st.integers(1, min(s)), label=f"recv_rank_{m}") for m, s in shapes.items()}
        factors = agg.distribute(state, ranks, alpha)
    else:
        r = data.draw(st.integers(1, min(min(s) for s in shapes.values())), label="recv_rank")
        ranks = {m: r for m in shapes}
        factors = agg.distribute(state, r, alpha)
    assert set(factors) == set(shapes)
    _assert_matches_reference(helpers, updates, state, factors, ranks, alpha, rtol=F32_RTOL)


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_float64_inputs_are_exact_to_float64_precision(helpers, data):
    updates, shapes = helpers.draw_round(data, dtype=torch.float64)
    agg = FlexLoRA()
    state = agg.aggregate(updates)
    ranks = {m: data.draw(st.integers(1, min(s)), label=f"r_{m}") for m, s in shapes.items()}
    factors = agg.distribute(state, ranks, 4.0)
    for _m, (A, B) in factors.items():
        assert A.dtype == torch.float64 and B.dtype == torch.float64
    _assert_matches_reference(helpers, updates, state, factors, ranks, 4.0, rtol=1e-10)


def test_distribute_rank_dict_and_receiving_alpha_differs(helpers, gen):
    shapes = {"layers.0.self_attn.q_proj": (24, 20), "layers.0.mlp.up_proj": (30, 12)}
    updates = [
        helpers.make_update(gen, shapes, {"layers.0.self_attn.q_proj": 2, "layers.0.mlp.up_proj": 9}, num_examples=5, alpha=16.0),
        helpers.make_update(gen, shapes, {"layers.0.self_attn.q_proj": 7, "layers.0.mlp.up_proj": 1}, num_examples=40, alpha=8.0),
        helpers.make_update(gen, shapes, {"layers.0.self_attn.q_proj": 4, "layers.0.mlp.up_proj": 3}, num_examples=11, alpha=32.0),
    ]
    agg = FlexLoRA()
    state = agg.aggregate(updates)
    ranks = {"layers.0.self_attn.q_proj": 5, "layers.0.mlp.up_proj": 2}
    for alpha in (16.0, 3.0):
        factors = agg.distribute(state, ranks, alpha)
        _assert_matches_reference(helpers, updates, state, factors, ranks, alpha, rtol=F32_RTOL)
        # The receiving alpha only rescales B: (alpha / r) B is fixed.
        A16, B16 = agg.distribute(state, ranks, 16.0)["layers.0.mlp.up_proj"]
        A, B = factors["layers.0.mlp.up_proj"]
        torch.testing.assert_close(A, A16)
        torch.testing.assert_close(B * alpha, B16 * 16.0, rtol=1e-6, atol=1e-6)


def _round(helpers, gen, shapes, ranks, *, alphas=(16.0, 8.0, 16.0, 32.0), ns=(10, 3, 50, 7)):
    return [
        helpers.make_update(gen, shapes, r, num_examples=n, alpha=a)
        for r, a, n in zip(ranks, alphas, ns)
    ]


@pytest.mark.parametrize("method", ["cholesky", "gram", "qr", "dense", "auto"])
def test_exact_svd_paths_agree_with_reference(helpers, gen, method):
    shapes = {"m": (48, 36), "n": (20, 44)}
    updates = _round(helpers, gen, shapes, [2, 5, 3, 6])  # R = 16 <= min(out, in)
    agg = FlexLoRA(svd_method=method)
    state = agg.aggregate(updates)
    for m in shapes:
        assert state.modules[m].svd.method == ("qr" if method == "auto" else method)
        assert helpers.rel_err(dense_update(state, m), helpers.reference_dense(updates, m)) <= F32_RTOL
    ranks = {"m": 4, "n": 9}
    _assert_matches_reference(helpers, updates, state, agg.distribute(state, ranks, 16.0), ranks, 16.0, rtol=F32_RTOL)


@pytest.mark.parametrize("total_rank,expected", [(27, "qr"), (28, "dense"), (40, "dense")])
def test_auto_crossover_picks_path_and_stays_exact(helpers, gen, total_rank, expected):
    # min(out, in) = 32 and dense_threshold 0.85: the crossover is at R = 27.2.
    shapes = {"m": (40, 32)}
    first = min(total_rank - 1, 32)
    updates = [
        helpers.make_update(gen, shapes, first, num_examples=3, alpha=16.0),
        helpers.make_update(gen, shapes, total_rank - first, num_examples=5, alpha=4.0),
    ]
    agg = FlexLoRA()
    state = agg.aggregate(updates)
    assert state.modules["m"].svd.method == expected
    ref = helpers.reference_dense(updates, "m")
    assert helpers.rel_err(dense_update(state, "m"), ref) <= F32_RTOL
    ranks = {"m": 10}
    _assert_matches_reference(helpers, updates, state, agg.distribute(state, 10, 16.0), ranks, 16.0, rtol=F32_RTOL)


def _decaying_round(gen, out_f=48, in_f=40, k=20):
    """Two clients whose weighted sum has singular values decaying like 2^-i."""
    Q1, _ = torch.linalg.qr(torch.randn(out_f, k, generator=gen, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(in_f, k, generator=gen, dtype=torch.float64))
    s = 0.5 ** torch.arange(k, dtype=torch.float64)
    # client 0 holds the even directions, client 1 the odd ones; p = 1/2 each, alpha/r = 1.
    ups = []
    for parity in (0, 1):
        idx = torch.arange(parity, k, 2)
        r = idx.numel()
        B = (Q1[:, idx] * (2 * s[idx])).float()
        A = Q2[:, idx].T.float()
        ups.append(ClientUpdate({"m": (A, B)}, num_examples=10, alpha=float(r)))
    return ups


def test_randomized_is_close_on_fast_decaying_spectrum(helpers, gen):
    updates = _decaying_round(gen)
    ref = helpers.reference_dense(updates, "m")
    assert torch.allclose(torch.linalg.svdvals(ref)[:3], torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))
    agg = FlexLoRA(svd_method="randomized", max_rank=5, seed=3)
    state = agg.aggregate(updates)
    assert state.modules["m"].svd.method == "randomized"
    assert state.modules["m"].svd.S.shape[0] == 5
    for r in (1, 3, 5):
        eff = helpers.effective(agg.distribute(state, r, 16.0), 16.0)["m"]
        assert helpers.rel_err(eff, helpers.best_rank(ref, r)) <= 1e-4


def test_randomized_only_when_asked(helpers, gen, monkeypatch):
    assert FlexLoRA().svd_method == "auto"
    assert get_aggregator("flexlora").svd_method == "auto"

    def boom(*args, **kwargs):
        raise AssertionError("randomized SVD used without being asked for")

    monkeypatch.setattr(lowrank_mod, "randomized_svd_of_product", boom)
    for total in (3, 30, 60):  # qr, dense, dense (R > min(out, in))
        shapes = {"m": (36, 32)}
        updates = [helpers.make_update(gen, shapes, min(total, 32), num_examples=2),
                   helpers.make_update(gen, shapes, max(total - 32, 1), num_examples=9)]
        state = FlexLoRA().aggregate(updates)
        assert state.modules["m"].svd.method in ("qr", "dense")
    with pytest.raises(AggregationError, match="max_rank"):
        FlexLoRA(svd_method="randomized")
    with pytest.raises(AggregationError, match="svd_method"):
        FlexLoRA(svd_method="lanczos")


def test_eckart_young_optimality_against_competitors(helpers, gen):
    shapes = {"m": (32, 28)}
    updates = _round(helpers, gen, shapes, [4, 4, 4, 4], alphas=(16.0,) * 4)
    agg = FlexLoRA()
    state = agg.aggregate(updates)
    ref = helpers.reference_dense(updates, "m")
    p = helpers.weights(updates)
    for r in (1, 4, 9):
        eff = helpers.effective(agg.distribute(state, r, 16.0), 16.0)["m"]
        err = float(torch.linalg.norm(ref - eff))
        opt = helpers.tail_error(ref, r)
        assert err == pytest.approx(opt, rel=1e-5, abs=1e-6 * float(torch.linalg.norm(ref)))
        # random rank-r competitors, and small perturbations of the optimum
        g = torch.Generator().manual_seed(r)
        for _ in range(20):
            X = torch.randn(32, r, generator=g, dtype=torch.float64) @ torch.randn(r, 28, generator=g, dtype=torch.float64)
            X *= float(torch.linalg.norm(ref)) / float(torch.linalg.norm(X))
            assert err <= float(torch.linalg.norm(ref - X))
            A, B = agg.distribute(state, r, 16.0)["m"]
            dA = 1e-2 * torch.randn(A.shape, generator=g, dtype=torch.float64)
            dB = 1e-2 * torch.randn(B.shape, generator=g, dtype=torch.float64)
            Xp = (16.0 / r) * (B.double() + dB) @ (A.double() + dA)
            assert err <= float(torch.linalg.norm(ref - Xp)) + 1e-9
        # other truncations: the wrong singular triplets (skipping the first), and the naive
        # product of averaged factors (FedAvg), which has rank <= 4
        U, S, Vh = torch.linalg.svd(ref)
        wrong = (U[:, 1 : r + 1] * S[1 : r + 1]) @ Vh[1 : r + 1]
        assert err < float(torch.linalg.norm(ref - wrong))
        if r >= 4:
            A_bar = sum(pk * u.factors["m"][0].double() for pk, u in zip(p, updates))
            B_bar = sum(pk * u.factors["m"][1].double() for pk, u in zip(p, updates))
            naive = (16.0 / 4) * B_bar @ A_bar
            assert err < float(torch.linalg.norm(ref - naive))


def test_invariance_to_split_between_A_and_B(helpers, gen):
    shapes = {"m": (26, 22)}
    updates = _round(helpers, gen, shapes, [3, 5, 2, 4])
    agg = FlexLoRA()
    base = agg.aggregate(updates)
    r = 6
    eff = helpers.effective(agg.distribute(base, r, 16.0), 16.0)["m"]
    A1, B1 = updates[1].factors["m"]
    # (A c, B / c)
    scaled = list(updates)
    scaled[1] = ClientUpdate({"m": (A1 * 8.0, B1 / 8.0)}, num_examples=updates[1].num_examples, alpha=updates[1].alpha)
    # (Q A, B Q^-1) with an invertible, non-orthogonal Q
    Q = torch.randn(5, 5, generator=gen, dtype=torch.float64) + 3 * torch.eye(5, dtype=torch.float64)
    mixed = list(updates)
    mixed[1] = ClientUpdate(
        {"m": ((Q @ A1.double()).float(), (B1.double() @ torch.linalg.inv(Q)).float())},
        num_examples=updates[1].num_examples,
        alpha=updates[1].alpha,
    )
    for variant in (scaled, mixed):
        st_v = agg.aggregate(variant)
        assert helpers.rel_err(dense_update(st_v, "m"), dense_update(base, "m")) <= 1e-5
        eff_v = helpers.effective(agg.distribute(st_v, r, 16.0), 16.0)["m"]
        assert helpers.rel_err(eff_v, eff) <= 1e-5


def test_split_option_gives_same_effective_update(helpers, gen):
    shapes = {"m": (30, 18)}
    updates = _round(helpers, gen, shapes, [3, 5, 2, 4])
    r, alpha = 5, 12.0
    out = {}
    for split in ("B", "A", "sqrt"):
        agg = FlexLoRA(split=split)
        state = agg.aggregate(updates)
        A, B = (t.double() for t in agg.distribute(state, r, alpha)["m"])
        out[split] = (A, B)
        S = state.modules["m"].svd.S[:r].double()
        c = r / alpha
        # where the singular values go
        if split == "B":
            torch.testing.assert_close(A @ A.T, torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)
            torch.testing.assert_close(B.T @ B, torch.diag(S * c) ** 2, atol=1e-4 * float(S[0] * c) ** 2, rtol=0)
        elif split == "A":
            torch.testing.assert_close(B.T @ B, c**2 * torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)
            torch.testing.assert_close(A @ A.T, torch.diag(S**2), atol=1e-4 * float(S[0]) ** 2, rtol=0)
        else:
            torch.testing.assert_close(A @ A.T, torch.diag(S), atol=1e-5 * float(S[0]), rtol=0)
            torch.testing.assert_close(B.T @ B, c**2 * torch.diag(S), atol=1e-5 * float(S[0]) * c**2, rtol=0)
    ref = helpers.best_rank(helpers.reference_dense(updates, "m"), r)
    for split, (A, B) in out.items():
        assert helpers.rel_err((alpha / r) * B @ A, ref) <= 1e-5, split
    with pytest.raises(AggregationError, match="split"):
        FlexLoRA(split="C")


@pytest.mark.parametrize("alpha", [16.0, 5.0])
def test_single_client_reproduces_its_update(helpers, gen, alpha):
    shapes = {"q": (20, 24), "up": (40, 16)}
    ranks = {"q": 3, "up": 7}
    u = helpers.make_update(gen, shapes, ranks, num_examples=17, alpha=alpha)
    agg = FlexLoRA()
    state = agg.aggregate([u])
    factors = agg.distribute(state, ranks, alpha)
    for m in shapes:
        own = helpers.client_product(u, m)
        assert helpers.rel_err(helpers.effective(factors, alpha)[m], own) <= 1e-5
        assert state.modules[m].svd.S.shape[0] == ranks[m]


def test_equal_ranks_full_participation_reproduce_weighted_average(helpers, gen):
    shapes = {"m": (20, 16)}
    updates = _round(helpers, gen, shapes, [3, 3, 3, 3], alphas=(16.0,) * 4)
    agg = FlexLoRA()
    state = agg.aggregate(updates)
    # naive weighted average of the products, by hand
    p = [u.num_examples / sum(v.num_examples for v in updates) for u in updates]
    avg = sum(pk * (16.0 / 3) * u.factors["m"][1].double() @ u.factors["m"][0].double() for pk, u in zip(p, updates))
    assert helpers.rel_err(dense_update(state, "m"), avg) <= 1e-5
    for r in (12, 16):  # R = 12 = sum of ranks; 16 = min(out, in)
        eff = helpers.effective(agg.distribute(state, r, 16.0), 16.0)["m"]
        assert helpers.rel_err(eff, avg) <= 1e-5


@pytest.mark.parametrize("split", ["B", "A", "sqrt"])
def test_distribute_beyond_global_rank_pads_orthonormally(helpers, gen, split):
    shapes = {"m": (14, 12)}
    updates = [helpers.make_update(gen, shapes, 2, num_examples=3), helpers.make_update(gen, shapes, 1, num_examples=4)]
    agg = FlexLoRA(split=split)
    state = agg.aggregate(updates)
    assert state.modules["m"].rank == 3
    ref = helpers.reference_dense(updates, "m")
    for r in (5, 12):
        A, B = agg.distribute(state, r, 16.0)["m"]
        assert A.shape == (r, 12) and B.shape == (14, r)
        assert helpers.rel_err(helpers.effective({"m": (A, B)}, 16.0)["m"], ref) <= 1e-5
        assert int(torch.linalg.matrix_rank(A.double())) == r  # A has full row rank
        pad = A[3:].double()
        torch.testing.assert_close(pad @ pad.T, torch.eye(r - 3, dtype=torch.float64), atol=1e-5, rtol=0)
        V = state.modules["m"].svd.V.double()  # the kept directions (A's first rows span them)
        torch.testing.assert_close(pad @ V, torch.zeros(r - 3, 3, dtype=torch.float64), atol=1e-5, rtol=0)
        assert torch.count_nonzero(B[:, 3:]) == 0


def test_max_rank_keeps_that_many_triplets(helpers, gen):
    shapes = {"m": (30, 26), "n": (24, 40)}
    updates = _round(helpers, gen, shapes, [4, 6, 5, 3])  # R = 18 <= min(out, in): every path applies
    for method in ("auto", "qr", "dense"):
        agg = FlexLoRA(max_rank=5, svd_method=method)
        state = agg.aggregate(updates)
        for m in shapes:
            assert state.modules[m].svd.S.shape[0] == 5
            assert state.modules[m].svd.U.shape == (shapes[m][0], 5)
            assert state.modules[m].svd.V.shape == (shapes[m][1], 5)
        for r in (1, 3, 5):
            ranks = {m: r for m in shapes}
            _assert_matches_reference(helpers, updates, state, agg.distribute(state, r, 16.0), ranks, 16.0, rtol=F32_RTOL)
    # max_rank above the update's rank keeps the full rank
    state = FlexLoRA(max_rank=30).aggregate(updates)
    assert state.modules["n"].svd.S.shape[0] == 18
    with pytest.raises(AggregationError, match="max_rank"):
        FlexLoRA(max_rank=0)


def test_distribute_cache_and_one_svd_per_module(helpers, gen, monkeypatch):
    shapes = {"a": (24, 20), "b": (16, 28), "c": (40, 40)}
    updates = _round(helpers, gen, shapes, [2, 4, 6, 8])
    svd_calls = []
    real_svd = torch.linalg.svd

    def counting_svd(*args, **kwargs):
        svd_calls.append(args[0].shape)
        return real_svd(*args, **kwargs)

    product_calls = []
    real_product = flexlora_mod.svd_of_product

    def counting_product(*args, **kwargs):
        product_calls.append(args[0].shape)
        return real_product(*args, **kwargs)

    dense_calls = []
    real_dense = flexlora_mod.svd_of_dense

    def counting_dense(*args, **kwargs):
        dense_calls.append(args[0].shape)
        return real_dense(*args, **kwargs)

    trunc_calls = []
    real_trunc = base_mod.truncate_to_factors

    def counting_trunc(*args, **kwargs):
        trunc_calls.append(args[1])
        return real_trunc(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    monkeypatch.setattr(flexlora_mod, "svd_of_product", counting_product)
    monkeypatch.setattr(flexlora_mod, "svd_of_dense", counting_dense)
    monkeypatch.setattr(base_mod, "truncate_to_factors", counting_trunc)
    agg = FlexLoRA()
    state = agg.aggregate(updates)
    # One SVD per module per round. Module "b" (16 x 28) has total rank 20 > min(out, in) = 16, so
    # its running sum is kept dense and SVD'd as such; "a" and "c" go through the factored path.
    assert sorted(product_calls) == [(24, 20), (40, 20)] and dense_calls == [(16, 28)]
    assert len(svd_calls) == 3
    client_ranks = [8, 13, 8, 4, 8, 4, 13]
    sent = [agg.distribute(state, r, 16.0) for r in client_ranks]
    assert len(svd_calls) == 3 and len(product_calls) == 2 and len(dense_calls) == 1  # distribution does no SVD
    assert len(trunc_calls) == 3 * len(set(client_ranks))  # one truncation per module per distinct rank
    first = sent[0]
    again = sent[2]
    for m in shapes:
        assert again[m][0] is first[m][0] or torch.equal(again[m][0], first[m][0])
        assert again[m][1] is first[m][1] or torch.equal(again[m][1], first[m][1])
    # a different alpha is a different truncation, with the same effective update
    other = agg.distribute(state, 8, 2.0)
    for m in shapes:
        torch.testing.assert_close(helpers.effective(other, 2.0)[m], helpers.effective(first, 16.0)[m])


def test_previous_state_is_ignored_but_round_counts(helpers, gen):
    shapes = {"m": (12, 10)}
    r1 = _round(helpers, gen, shapes, [2, 3, 1, 2])
    r2 = _round(helpers, gen, shapes, [1, 4, 2, 2])
    agg = FlexLoRA()
    s1 = agg.aggregate(r1)
    s2 = agg.aggregate(r2, previous=s1)
    assert s1.round == 1 and s2.round == 2 and s2.aggregator == "flexlora"
    torch.testing.assert_close(dense_update(s2, "m"), dense_update(agg.aggregate(r2), "m"))


def test_low_precision_inputs_are_decomposed_in_float32(helpers, gen):
    shapes = {"m": (20, 24)}
    updates = [
        helpers.make_update(gen, shapes, 3, num_examples=2, dtype=torch.bfloat16),
        helpers.make_update(gen, shapes, 5, num_examples=6, dtype=torch.bfloat16, alpha=8.0),
    ]
    agg = FlexLoRA()
    state = agg.aggregate(updates)
    assert state.modules["m"].svd.U.dtype == torch.float32
    # the reference uses the bfloat16 values exactly (upcast to float64)
    assert helpers.rel_err(dense_update(state, "m"), helpers.reference_dense(updates, "m")) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device in this environment")
def test_aggregation_on_cuda_matches_cpu_reference(helpers, gen):
    shapes = {"m": (48, 40), "n": (16, 64)}
    cpu = _round(helpers, gen, shapes, [2, 8, 5, 3])
    cuda = [
        ClientUpdate({m: (a.cuda(), b.cuda()) for m, (a, b) in u.factors.items()}, u.num_examples, u.alpha)
        for u in cpu
    ]
    for name in ("flexlora", "flora", "hetlora"):
        agg = get_aggregator(name)
        state = agg.aggregate(cuda)
        factors = agg.distribute(state, 4, 16.0)
        for m in shapes:
            assert factors[m][0].device.type == "cuda"
            if name == "flexlora" or name == "flora":
                ref = helpers.reference_dense(cpu, m)
                assert helpers.rel_err(dense_update(state, m).cpu(), ref) <= 1e-5
                eff = helpers.effective(factors, 16.0)[m].cpu()
                assert helpers.rel_err(eff, helpers.best_rank(ref, 4)) <= 1e-4
    homo = [helpers.make_update(gen, shapes, 4, num_examples=n) for n in (3, 9)]
    homo_cuda = [ClientUpdate({m: (a.cuda(), b.cuda()) for m, (a, b) in u.factors.items()}, u.num_examples) for u in homo]
    state = get_aggregator("fedavg").aggregate(homo_cuda)
    A_bar = (3 * homo[0].factors["m"][0] + 9 * homo[1].factors["m"][0]) / 12
    torch.testing.assert_close(state.modules["m"].A.cpu(), A_bar)
    assert math.isfinite(float(dense_update(state, "m").sum()))


# ---------------------------------------------------------------------------------------- rsLoRA
# Ranks 2..9 throughout: there sqrt(r) != r, so a code path that ignored rslora would be off by a
# factor sqrt(r) and fail every comparison below.


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_rslora_distribute_matches_naive_reference_property(helpers, data):
    # Clients mix alpha / r and alpha / sqrt(r); the reference scales each by its own rule.
    updates, shapes = helpers.draw_round(data, rslora=None)
    agg = FlexLoRA()
    state = agg.aggregate(updates)
    for m in shapes:
        assert helpers.rel_err(dense_update(state, m), helpers.reference_dense(updates, m)) <= F32_RTOL
    alpha = data.draw(st.sampled_from([16.0, 1.0, 7.5]), label="recv_alpha")
    ranks = {m: data.draw(st.integers(1, min(s)), label=f"recv_rank_{m}") for m, s in shapes.items()}
    factors = agg.distribute(state, ranks, alpha, rslora=True)
    _assert_matches_reference(helpers, updates, state, factors, ranks, alpha, rtol=F32_RTOL, rslora=True)


def test_rslora_aggregate_and_redistribution_by_hand(gen):
    ranks, ns, alphas = (2, 5, 9), (7, 20, 13), (16.0, 8.0, 16.0)
    updates = []
    for r, n, a in zip(ranks, ns, alphas):
        A = torch.randn(r, 26, generator=gen)
        B = torch.randn(30, r, generator=gen)
        updates.append(ClientUpdate({"m": (A, B)}, num_examples=n, alpha=a, rslora=True))
    # Naive reference, written out here: sum_k (n_k / N) (alpha_k / sqrt(r_k)) B_k A_k in float64.
    total = sum(ns)
    ref = torch.zeros(30, 26, dtype=torch.float64)
    plain = torch.zeros(30, 26, dtype=torch.float64)
    for u in updates:
        A, B = u.factors["m"]
        r = A.shape[0]
        ref += (u.num_examples / total) * (u.alpha / math.sqrt(r)) * (B.double() @ A.double())
        plain += (u.num_examples / total) * (u.alpha / r) * (B.double() @ A.double())
    agg = FlexLoRA()
    state = agg.aggregate(updates)
    got = dense_update(state, "m").double()
    assert float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref)) <= 1e-5
    # Guard: the plain-LoRA aggregate is far from it, so ignoring rslora would fail above.
    assert float(torch.linalg.norm(plain - ref) / torch.linalg.norm(ref)) > 0.1
    U, S, Vh = torch.linalg.svd(ref, full_matrices=False)
    for r, alpha in ((3, 16.0), (6, 4.0), (16, 16.0)):
        A, B = agg.distribute(state, r, alpha, rslora=True)["m"]
        assert A.shape == (r, 26) and B.shape == (30, r)
        best = (U[:, :r] * S[:r]) @ Vh[:r]  # Eckart-Young: the best rank-r approximation
        eff = (alpha / math.sqrt(r)) * (B.double() @ A.double())
        assert float(torch.linalg.norm(eff - best) / torch.linalg.norm(best)) <= 1e-5, r
        # The same factors read with the plain scaling are a different update.
        wrong = (alpha / r) * (B.double() @ A.double())
        assert float(torch.linalg.norm(wrong - best) / torch.linalg.norm(best)) > 0.1, r
        # A plain-LoRA receiver gets other factors with the same effective update.
        A2, B2 = agg.distribute(state, r, alpha)["m"]
        eff2 = (alpha / r) * (B2.double() @ A2.double())
        assert float(torch.linalg.norm(eff2 - best) / torch.linalg.norm(best)) <= 1e-5, r


@pytest.mark.parametrize("split", ["B", "A", "sqrt"])
def test_rslora_split_and_padding_keep_effective_update(helpers, gen, split):
    shapes = {"m": (14, 12)}
    updates = [helpers.make_update(gen, shapes, 2, num_examples=3, rslora=True),
               helpers.make_update(gen, shapes, 3, num_examples=4)]
    agg = FlexLoRA(split=split)
    state = agg.aggregate(updates)
    ref = helpers.reference_dense(updates, "m")
    for r in (3, 4, 9):  # 3 and 4 truncate the rank-5 global update, 9 pads it
        A, B = agg.distribute(state, r, 10.0, rslora=True)["m"]
        eff = helpers.effective({"m": (A, B)}, 10.0, rslora=True)["m"]
        assert helpers.rel_err(eff, helpers.best_rank(ref, r)) <= 1e-5, r


def test_rslora_is_its_own_cache_entry(helpers, gen):
    shapes = {"m": (20, 16)}
    updates = [helpers.make_update(gen, shapes, 4, num_examples=3)]
    agg = FlexLoRA()
    state = agg.aggregate(updates)
    plain = agg.distribute(state, 4, 16.0)["m"]
    rs = agg.distribute(state, 4, 16.0, rslora=True)["m"]
    # Same A, and B differs by the ratio of the scalings: (16 / 4) / (16 / 2) = 1 / 2.
    torch.testing.assert_close(rs[0], plain[0])
    torch.testing.assert_close(rs[1], plain[1] * 0.5, rtol=1e-6, atol=1e-7)
    assert torch.equal(agg.distribute(state, 4, 16.0)["m"][1], plain[1])
    with pytest.raises(AggregationError, match="rslora"):
        agg.distribute(state, 4, 16.0, rslora="true")  # type: ignore[arg-type]
