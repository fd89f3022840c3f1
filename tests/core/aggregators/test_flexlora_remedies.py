"""FlexLoRA's rank-collapse remedies (remedy="server-memory" and "rank-partitioned") against
the collapse they remedy and against naive dense float64 references written from the formulas:

- server memory: ``G_{t+1} = G_t + sum_k p_k (s_k B_k A_k - T_{r_k}(G_t))``, ``T_r`` the best
  rank-``r`` approximation (full SVD of the dense matrix), truncated to ``max_rank``;
- rank partitioned: column ``i`` of client ``k`` weighted by ``p_k / sum_{j: r_j > i} p_j``.
"""

from __future__ import annotations

import pytest
import torch

from flexlora.core import AggregationError, ClientUpdate, FlexLoRA, GlobalState, get_aggregator
from flexlora.core.aggregators.base import ModuleState
from flexlora.core.lowrank import LowRankSVD

SHAPE = (40, 36)
RANKS = [2, 5, 12]
SIZES = [3, 2, 5]
ALPHA = 16.0


def _state(gen: torch.Generator, rank: int) -> GlobalState:
    # A global update with well separated singular values 10, 9, ..., so truncations are unique.
    U, _ = torch.linalg.qr(torch.randn(SHAPE[0], rank, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(SHAPE[1], rank, generator=gen, dtype=torch.float64))
    S = torch.linspace(10.0, 10.0 - 0.5 * (rank - 1), rank, dtype=torch.float64)
    svd = LowRankSVD(U.float(), S.float(), V.float())
    return GlobalState(aggregator="flexlora", modules={"m": ModuleState(shape=SHAPE, svd=svd)}, round=1)


def _echo_round(agg: FlexLoRA, state: GlobalState, ranks=RANKS, sizes=SIZES) -> list[ClientUpdate]:
    # Every client returns exactly the factors it was sent (no local learning).
    out = []
    for r, n in zip(ranks, sizes):
        A, B = agg.distribute(state, {"m": r}, ALPHA)["m"]
        out.append(ClientUpdate({"m": (A, B)}, num_examples=n, alpha=ALPHA))
    return out


def _holders_weight(ranks, sizes, i) -> float:
    total = sum(sizes)
    return sum(n for r, n in zip(ranks, sizes) if r > i) / total


def test_faithful_flexlora_decays_geometrically_on_an_echo_round():
    gen = torch.Generator().manual_seed(0)
    state = _state(gen, max(RANKS))
    S0 = state.modules["m"].svd.S.double()
    P = torch.tensor([_holders_weight(RANKS, SIZES, i) for i in range(max(RANKS))], dtype=torch.float64)
    agg = FlexLoRA(max_rank=max(RANKS))
    for t in range(1, 4):
        state = agg.aggregate(_echo_round(agg, state), previous=state)
        S = state.modules["m"].svd.S.double()
        # Predicted: direction i keeps the share P_i of the clients holding it, every round.
        expected = (S0 * P**t).sort(descending=True).values
        assert torch.allclose(S, expected, rtol=1e-4, atol=1e-5), (t, S, expected)
    # The tail really collapsed: the rank-12 directions kept 0.5^3 of their value.
    assert float(S0[-1] * P[-1] ** 3) < 0.2 * float(S0[-1])


@pytest.mark.parametrize("remedy", ["server-memory", "rank-partitioned"])
def test_remedies_keep_every_singular_value_on_an_echo_round(remedy):
    gen = torch.Generator().manual_seed(1)
    state = _state(gen, max(RANKS))
    G0 = state.modules["m"].svd.dense().double()
    S0 = state.modules["m"].svd.S.double()
    agg = FlexLoRA(max_rank=max(RANKS), remedy=remedy)
    for t in range(1, 4):
        state = agg.aggregate(_echo_round(agg, state), previous=state)
        S = state.modules["m"].svd.S.double()
        assert torch.allclose(S, S0, rtol=1e-5, atol=1e-5), (remedy, t, S, S0)
        G = state.modules["m"].svd.dense().double()
        assert float(torch.linalg.norm(G - G0) / torch.linalg.norm(G0)) < 1e-5


def _random_updates(gen, ranks, sizes, scale=1.0):
    out = []
    for r, n in zip(ranks, sizes):
        A = torch.randn(r, SHAPE[1], generator=gen)
        B = scale * torch.randn(SHAPE[0], r, generator=gen)
        out.append(ClientUpdate({"m": (A, B)}, num_examples=n, alpha=ALPHA))
    return out


def _best_rank(M: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def _product(u: ClientUpdate) -> torch.Tensor:
    A, B = u.factors["m"]
    return (u.alpha / A.shape[0]) * (B.double() @ A.double())


def test_server_memory_matches_its_dense_formula_with_mixed_ranks():
    gen = torch.Generator().manual_seed(2)
    max_rank = max(RANKS)
    agg = FlexLoRA(max_rank=max_rank, remedy="server-memory")
    faithful = FlexLoRA(max_rank=max_rank)
    first = _random_updates(gen, RANKS, SIZES)
    state = agg.aggregate(first)
    # Round 1 (nothing sent before) is faithful FlexLoRA.
    assert torch.allclose(state.modules["m"].svd.dense(), faithful.aggregate(first).modules["m"].svd.dense(), atol=1e-5)
    G = state.modules["m"].svd.dense().double()
    for _ in range(2):
        ups = _random_updates(gen, RANKS, SIZES, scale=0.3)
        p = [n / sum(SIZES) for n in SIZES]
        ref = G + sum(pk * (_product(u) - _best_rank(G, r)) for pk, u, r in zip(p, ups, RANKS))
        ref = _best_rank(ref, max_rank)
        state = agg.aggregate(ups, previous=state)
        G = state.modules["m"].svd.dense().double()
        assert float(torch.linalg.norm(G - ref) / torch.linalg.norm(ref)) < 1e-5


def test_rank_partitioned_matches_its_columnwise_formula():
    gen = torch.Generator().manual_seed(3)
    ranks, sizes = [3, 8, 3, 20, 8], [1, 4, 2, 3, 5]
    ups = _random_updates(gen, ranks, sizes)
    total = sum(sizes)
    ref = torch.zeros(SHAPE, dtype=torch.float64)
    for u, n in zip(ups, sizes):
        A, B = u.factors["m"]
        r = A.shape[0]
        for i in range(r):
            w = (n / total) / _holders_weight(ranks, sizes, i)
            ref += w * (u.alpha / r) * torch.outer(B[:, i].double(), A[i].double())
    state = FlexLoRA(remedy="rank-partitioned").aggregate(ups)
    G = state.modules["m"].svd.dense().double()
    assert float(torch.linalg.norm(G - ref) / torch.linalg.norm(ref)) < 1e-5
    # And it is not the faithful average (the test can tell them apart).
    G_faithful = FlexLoRA().aggregate(ups).modules["m"].svd.dense().double()
    assert float(torch.linalg.norm(G_faithful - ref) / torch.linalg.norm(ref)) > 1e-2


@pytest.mark.parametrize("remedy", ["server-memory", "rank-partitioned"])
def test_remedies_reduce_to_faithful_when_every_client_holds_the_full_rank(remedy):
    gen = torch.Generator().manual_seed(4)
    r = 6
    faithful = FlexLoRA(max_rank=r)
    agg = FlexLoRA(max_rank=r, remedy=remedy)
    first = _random_updates(gen, [r, r, r], SIZES)
    s_f, s_r = faithful.aggregate(first), agg.aggregate(first)
    for _ in range(2):
        ups = _random_updates(gen, [r, r, r], SIZES, scale=0.5)
        s_f, s_r = faithful.aggregate(ups, previous=s_f), agg.aggregate(ups, previous=s_r)
        assert torch.equal(s_f.modules["m"].svd.S, s_r.modules["m"].svd.S)
        assert torch.equal(s_f.modules["m"].svd.U, s_r.modules["m"].svd.U)


def test_unknown_remedy_is_refused_with_the_choices():
    with pytest.raises(AggregationError, match="server-memory.*rank-partitioned"):
        get_aggregator("flexlora", remedy="error-feedback")
    assert get_aggregator("flexlora", remedy="server-memory").remedy == "server-memory"
    with pytest.raises(AggregationError, match="remedy"):
        get_aggregator("fedavg", remedy="server-memory")


def test_server_memory_names_a_previous_state_of_other_modules():
    gen = torch.Generator().manual_seed(5)
    agg = FlexLoRA(max_rank=12, remedy="server-memory")
    state = _state(gen, 12)
    state.modules = {"other": state.modules["m"]}
    with pytest.raises(AggregationError, match="not in the previous global state"):
        agg.aggregate(_random_updates(gen, RANKS, SIZES), previous=state)
