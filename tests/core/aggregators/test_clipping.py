"""Norm bounds on each client's contribution (flexlora.core.clipping), against dense references."""

from __future__ import annotations

import math

import pytest
import torch

from flexlora.core.aggregators import AggregationError, get_aggregator
from flexlora.core.clipping import AdaptiveClipNorm, factor_change_norm, product_change_norm
from flexlora.core.types import ClientUpdate, lora_scaling

SHAPES = {"q": (12, 10), "v": (9, 14)}


def _factors(gen: torch.Generator, rank: int, scale: float = 1.0) -> dict:
    return {m: (torch.randn(rank, i, generator=gen, dtype=torch.float64) * scale,
                torch.randn(o, rank, generator=gen, dtype=torch.float64) * scale) for m, (o, i) in SHAPES.items()}


def _update(factors: dict, n: int, cid: str, alpha: float = 16.0, rslora: bool = False) -> ClientUpdate:
    return ClientUpdate(factors=factors, num_examples=n, alpha=alpha, client_id=cid, rslora=rslora)


def _dense(factors: dict, s: dict) -> dict:
    return {m: s[m] * (b @ a) for m, (a, b) in factors.items()}


def _norm(d: dict) -> float:
    return math.sqrt(sum(float(t.square().sum()) for t in d.values()))


@pytest.mark.parametrize("rslora", [False, True])
def test_product_change_norm_is_the_dense_norm(rslora: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    f, sent = _factors(gen, 4), _factors(gen, 4)
    s = {m: lora_scaling(16.0, 4, rslora) for m in SHAPES}
    dense = {m: _dense(f, s)[m] - _dense(sent, s)[m] for m in SHAPES}
    assert product_change_norm(f, s, sent) == pytest.approx(_norm(dense), rel=1e-12)
    assert product_change_norm(f, s, None) == pytest.approx(_norm(_dense(f, s)), rel=1e-12)
    # A client that did not move has no contribution (up to rounding of the Gram cancellation).
    assert product_change_norm(sent, s, sent) <= 1e-6 * _norm(_dense(sent, s))


def test_factor_change_norm_is_the_norm_of_the_factor_differences() -> None:
    gen = torch.Generator().manual_seed(2)
    f, sent = _factors(gen, 3), _factors(gen, 3)
    want = math.sqrt(sum(float((f[m][0] - sent[m][0]).square().sum() + (f[m][1] - sent[m][1]).square().sum())
                         for m in SHAPES))
    assert factor_change_norm(f, sent) == pytest.approx(want, rel=1e-12)


def _round(gen: torch.Generator, ranks: list[int]) -> list[ClientUpdate]:
    return [_update(_factors(gen, r), 3 + k, f"c{k}") for k, r in enumerate(ranks)]


@pytest.mark.parametrize("remedy", ["none", "server-memory", "rank-partitioned"])
def test_flexlora_folds_each_contribution_within_the_bound(remedy: str) -> None:
    """Round 2 of FlexLoRA with a bound: the global is the dense reference
    sum_k p_k (T_k + c_k D_k) (or G + sum_k p_k c_k D_k with server memory), c_k = min(1, C/||D_k||)."""
    gen = torch.Generator().manual_seed(3)
    ranks = [2, 4, 6, 4]
    plain = get_aggregator("flexlora", remedy=remedy)
    prev = plain.aggregate(_round(gen, ranks))
    # Clients start from what they were sent and move by a step of their own.
    updates = []
    for k, r in enumerate(ranks):
        sent = plain.distribute(prev, r, 16.0)
        step = _factors(gen, r, scale=0.3 * (k + 1))
        updates.append(_update({m: (sent[m][0] + step[m][0], sent[m][1] + step[m][1]) for m in SHAPES}, 3 + k, f"c{k}"))
    norms = []
    for u, r in zip(updates, ranks):
        s = {m: 16.0 / r for m in SHAPES}
        norms.append(product_change_norm(u.factors, s, plain.distribute(prev, r, 16.0)))
    bound = sorted(norms)[1]  # clips the two or three largest
    agg = get_aggregator("flexlora", remedy=remedy, clip_norm=bound)
    acc = agg.begin_round(prev, ranks=[{m: r for m in SHAPES} for r in ranks])
    for u in updates:
        acc.add(u)
    got = acc.finish()
    assert [rec.clipped for rec in acc.clip_log] == [n > bound for n in norms] and sum(n > bound for n in norms) >= 2
    assert [rec.norm for rec in acc.clip_log] == pytest.approx(norms, rel=1e-12)
    total = sum(u.num_examples for u in updates)
    for m in SHAPES:
        want = torch.zeros(SHAPES[m], dtype=torch.float64)
        for u, r, n in zip(updates, ranks, norms):
            p, c, s = u.num_examples / total, min(1.0, bound / n), 16.0 / r
            a0, b0 = plain.distribute(prev, r, 16.0)[m]
            t = s * (b0 @ a0)
            d = s * (u.factors[m][1] @ u.factors[m][0]) - t
            want += p * (c * d if remedy == "server-memory" else t + c * d)
        if remedy == "server-memory":
            want += prev.dense(m)
        if remedy == "rank-partitioned":
            # Each rank band is averaged over its holders; with every contribution clipped the same
            # way, the reference is the plain rank-partitioned fold of the clipped products.
            clipped = []
            for u, r, n in zip(updates, ranks, norms):
                c = min(1.0, bound / n)
                a0, b0 = plain.distribute(prev, r, 16.0)[m]
                clipped.append((u, c, a0, b0))
            want = _partitioned_reference(m, clipped, ranks)
        assert torch.allclose(got.dense(m), want, atol=1e-9), m
    # The batch call is the same fold, bit for bit.
    again = agg.aggregate(updates, prev)
    assert all(torch.equal(got.dense(m), again.dense(m)) for m in SHAPES)


def _partitioned_reference(m: str, clipped: list, ranks: list[int]) -> torch.Tensor:
    bounds = sorted(set(ranks))
    out = torch.zeros(SHAPES[m], dtype=torch.float64)
    for lo, hi in zip([0, *bounds[:-1]], bounds):
        held = [(u, c, a0, b0, r) for (u, c, a0, b0), r in zip(clipped, ranks) if r >= hi]
        n = sum(u.num_examples for u, *_ in held)
        for u, c, a0, b0, r in held:
            a, b = u.factors[m]
            s = 16.0 / r
            prod = c * s * (b[:, lo:hi] @ a[lo:hi]) + (1 - c) * s * (b0[:, lo:hi] @ a0[lo:hi])
            out += u.num_examples / n * prod
    return out


def test_a_poisoning_client_is_bounded() -> None:
    """One client of five replies -1000x its honest update: unbounded it moves the global by about
    200x the honest update; with the bound at the honest clients' norm, by less than half of it."""
    gen = torch.Generator().manual_seed(4)
    common = _factors(gen, 4)
    honest = []
    for k in range(5):
        own = _factors(gen, 4, scale=0.1)
        honest.append(_update({m: (common[m][0] + own[m][0], common[m][1] + own[m][1]) for m in SHAPES}, 10, f"c{k}"))
    poisoned = list(honest)
    a0, b0 = zip(*[honest[0].factors[m] for m in SHAPES])
    poisoned[0] = _update({m: (honest[0].factors[m][0], -1000 * honest[0].factors[m][1]) for m in SHAPES}, 10, "c0")
    ref = get_aggregator("flexlora").aggregate(honest)
    h = {m: ref.dense(m) for m in SHAPES}

    def effect(state) -> float:
        return _norm({m: state.dense(m) - h[m] for m in SHAPES}) / _norm(h)

    assert effect(get_aggregator("flexlora").aggregate(poisoned)) > 150
    bound = product_change_norm(honest[1].factors, {m: 4.0 for m in SHAPES}, None)
    for name in ("flexlora", "flora"):
        clipped = get_aggregator(name, clip_norm=bound).aggregate(poisoned)
        assert effect(clipped) < 0.5, name


@pytest.mark.parametrize("name", ["fedavg", "hetlora"])
def test_factor_averaging_clips_the_factor_change_towards_what_was_sent(name: str) -> None:
    gen = torch.Generator().manual_seed(5)
    agg0 = get_aggregator(name)
    prev = agg0.aggregate(_round(gen, [4, 4, 4]))
    sent = agg0.distribute(prev, 4, 16.0)
    updates = [_update({m: (sent[m][0] + 0.5 * k * torch.randn(4, SHAPES[m][1], generator=gen, dtype=torch.float64),
                            sent[m][1] + 0.5 * k * torch.randn(SHAPES[m][0], 4, generator=gen, dtype=torch.float64))
                        for m in SHAPES}, 5, f"c{k}") for k in range(1, 4)]
    norms = [factor_change_norm(u.factors, sent) for u in updates]
    bound = norms[0] * 1.01
    agg = get_aggregator(name, clip_norm=bound)
    got = agg.aggregate(updates, prev)
    # The reference: the plain aggregator on factors moved back towards what was sent.
    moved = []
    for u, n in zip(updates, norms):
        c = min(1.0, bound / n)
        moved.append(_update({m: (sent[m][0] + c * (u.factors[m][0] - sent[m][0]),
                                  sent[m][1] + c * (u.factors[m][1] - sent[m][1])) for m in SHAPES}, 5, u.client_id))
        assert factor_change_norm(moved[-1].factors, sent) <= bound * (1 + 1e-12)
    want = agg0.aggregate(moved, prev)
    for m in SHAPES:
        assert torch.allclose(got.dense(m), want.dense(m), atol=1e-10), m


def test_an_explicit_starting_point_is_used_and_checked() -> None:
    """A first round (no previous state) from a shared fresh adapter: given ``sent``, FedAvg
    measures the change from it, not from zero."""
    gen = torch.Generator().manual_seed(6)
    start = {m: (torch.randn(3, i, generator=gen, dtype=torch.float64), torch.zeros(o, 3, dtype=torch.float64))
             for m, (o, i) in SHAPES.items()}
    u = _update({m: (a + 0.01, b + 0.01) for m, (a, b) in start.items()}, 4, "c0")
    acc = get_aggregator("fedavg", clip_norm=1.0).begin_round(None)
    acc.add(u, sent=start)
    assert not acc.clip_log[0].clipped and acc.clip_log[0].norm == pytest.approx(factor_change_norm(u.factors, start))
    acc2 = get_aggregator("fedavg", clip_norm=1.0).begin_round(None)
    acc2.add(u)  # from zero: A's whole norm counts
    assert acc2.clip_log[0].clipped
    bad = {m: (a[:2], b[:, :2]) for m, (a, b) in start.items()}
    with pytest.raises(AggregationError, match="factors it was sent"):
        get_aggregator("fedavg", clip_norm=1.0).begin_round(None).add(u, sent=bad)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, True, "1"])
def test_a_bad_bound_is_refused_by_name(bad) -> None:
    for name in ("flexlora", "fedavg", "hetlora", "flora"):
        with pytest.raises(AggregationError, match="clip_norm"):
            get_aggregator(name, clip_norm=bad)


def test_buffered_rank_partitioned_round_clips_like_the_planned_one() -> None:
    gen = torch.Generator().manual_seed(7)
    ranks = [2, 4, 4]
    updates = _round(gen, ranks)
    agg = get_aggregator("flexlora", remedy="rank-partitioned", clip_norm=3.0)
    planned = agg.begin_round(None, ranks=[{m: r for m in SHAPES} for r in ranks])
    unplanned = agg.begin_round(None)
    for u in updates:
        planned.add(u)
        unplanned.add(u)
    a, b = planned.finish(), unplanned.finish()
    assert [r.norm for r in planned.clip_log] == [r.norm for r in unplanned.clip_log]
    assert any(r.clipped for r in planned.clip_log)
    assert all(torch.equal(a.dense(m), b.dense(m)) for m in SHAPES)


def test_adaptive_bound_moves_geometrically_and_tracks_the_quantile() -> None:
    ad = AdaptiveClipNorm(1.0, quantile=0.5, lr=0.2)
    # Every norm within the bound: it shrinks by exp(-0.2 * (1 - 0.5)).
    assert ad.update([0.1, 0.2], clients=2) == pytest.approx(math.exp(-0.1))
    # On a fixed spread of norms it settles near their median.
    norms = [0.1 * k for k in range(1, 21)]  # median 1.05
    ad = AdaptiveClipNorm(10.0, quantile=0.5, lr=0.2)
    for _ in range(300):
        ad.update(norms, clients=len(norms))
    assert 0.9 <= ad.bound <= 1.2
    again = AdaptiveClipNorm(1.0, quantile=0.5)
    again.load_state_dict(ad.state_dict())
    assert again.bound == ad.bound
    with pytest.raises(AggregationError, match="quantile"):
        AdaptiveClipNorm(1.0, quantile=1.5)


# ------------------------------------------------------------------ client-level DP noise
def _zero_signal(name: str, m: int, shape=(120, 160), rank=4) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(8)
    o, i = shape
    # B = 0 (a fresh adapter): zero product; for factor averaging A = 0 too (zero factors).
    a = (lambda: torch.zeros(rank, i)) if name == "fedavg" else (lambda: torch.randn(rank, i, generator=gen))
    return [ClientUpdate(factors={"w": (a(), torch.zeros(o, rank))}, num_examples=5 + k, alpha=16.0,
                         client_id=f"c{k}") for k in range(m)]


@pytest.mark.parametrize("name", ["flexlora", "fedavg", "flora"])
def test_noise_std_on_a_zero_signal_round(name: str) -> None:
    """Every client sends nothing: the global is the noise alone, N(0, (z C)^2) per entry of the
    sum divided by the round's clients, so its entries' std is z C / m."""
    from flexlora.core.clipping import GaussianSumNoise

    m, C, z = 4, 0.5, 1.3
    agg = get_aggregator(name, clip_norm=C)
    acc = agg.begin_round(None)
    acc.noise = GaussianSumNoise(std=z * C, clients=m, seed=11)
    for u in _zero_signal(name, m - 1):  # one sampled client dropped: the denominator stays m
        acc.add(u)
    state = acc.finish()
    if name == "fedavg":
        st = state.modules["w"]
        samples = torch.cat([st.A.flatten(), st.B.flatten()])
    else:
        samples = state.dense("w").flatten()
    want = z * C / m
    # 19,200 (or more) entries: the sample std is within 3 % of the true one with overwhelming probability.
    assert float(samples.std()) == pytest.approx(want, rel=0.03)
    assert abs(float(samples.mean())) < 0.05 * want


def test_noise_weights_every_client_the_same_and_divides_by_the_sampled_clients() -> None:
    """With zero noise the DP round is (1/m) sum_k clipped contribution, whatever each n_k."""
    from flexlora.core.clipping import GaussianSumNoise

    gen = torch.Generator().manual_seed(9)
    updates = _round(gen, [2, 4, 4])
    bound = 5.0
    acc = get_aggregator("flexlora", clip_norm=bound).begin_round(None)
    acc.noise = GaussianSumNoise(std=0.0, clients=5, seed=0)
    for u in updates:
        acc.add(u)
    got = acc.finish()
    for mod in SHAPES:
        want = torch.zeros(SHAPES[mod], dtype=torch.float64)
        for u in updates:
            s = {x: 16.0 / u.rank(x) for x in SHAPES}
            c = min(1.0, bound / product_change_norm(u.factors, s, None))
            want += c * s[mod] * (u.factors[mod][1] @ u.factors[mod][0]) / 5
        assert torch.allclose(got.dense(mod), want, atol=1e-9), mod


def test_noise_is_refused_where_it_would_not_be_private() -> None:
    from flexlora.core.clipping import GaussianSumNoise

    gen = torch.Generator().manual_seed(10)
    u = _round(gen, [4])[0]
    noise = GaussianSumNoise(std=1.0, clients=1, seed=0)
    for name, kwargs, match in (("hetlora", {"clip_norm": 1.0}, "hetlora cannot add"),
                                ("flexlora", {}, "needs a clip_norm"),
                                ("flexlora", {"clip_norm": 1.0, "remedy": "rank-partitioned"}, "rank band")):
        acc = get_aggregator(name, **kwargs).begin_round(None, ranks=[{m: 4 for m in SHAPES}])
        acc.noise = noise
        with pytest.raises(AggregationError, match=match):
            acc.add(u)
    acc = get_aggregator("flexlora", clip_norm=1.0).begin_round(None)
    acc.noise = noise
    acc.add(u)
    other = _round(gen, [4])[0]
    with pytest.raises(AggregationError, match="more updates"):
        acc.add(ClientUpdate(factors=other.factors, num_examples=3, alpha=16.0, client_id="another"))
    with pytest.raises(AggregationError, match="noise std"):
        GaussianSumNoise(std=-1.0, clients=1, seed=0)


def test_noise_is_reproducible_from_its_seed_and_randomized_svd_keeps_the_signal() -> None:
    from flexlora.core.clipping import GaussianSumNoise

    gen = torch.Generator().manual_seed(12)
    updates = [_update({"w": (torch.randn(3, 300, generator=gen), torch.randn(200, 3, generator=gen))}, 1, f"c{k}")
               for k in range(3)]
    for u in updates:  # one shared signal direction so the signal dominates the noise
        u.factors["w"] = (updates[0].factors["w"][0], updates[0].factors["w"][1])

    def run(seed: int, **kw):
        acc = get_aggregator("flexlora", clip_norm=1e6, **kw).begin_round(None)
        acc.noise = GaussianSumNoise(std=0.01, clients=3, seed=seed)
        for u in updates:
            acc.add(u)
        return acc.finish()

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a.dense("w"), b.dense("w")) and not torch.equal(a.dense("w"), c.dense("w"))
    fast = run(1, max_rank=3, svd_method="randomized")
    exact3 = get_aggregator("flexlora").distribute(a, 3, 16.0)["w"]
    approx3 = get_aggregator("flexlora").distribute(fast, 3, 16.0)["w"]
    d_exact, d_fast = exact3[1] @ exact3[0], approx3[1] @ approx3[0]
    assert float((d_exact - d_fast).norm() / d_exact.norm()) < 1e-3
