"""Streaming aggregation (``Aggregator.begin_round``): folding the updates one at a time, in any
arrival order, gives the batch ``aggregate`` result to float32 accuracy, for every aggregator
(``aggregate`` is that fold run over the list, so in the list's order the two are identical);
a running :class:`LowRankSum` equals the naive float64 sum while its memory stays bounded; bad
updates are refused without touching the running aggregate."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexlora.core import AggregationError, ClientUpdate, get_aggregator
from flexlora.core.aggregators.base import Aggregator, BufferedAccumulator, GlobalState
from flexlora.core.lowrank_sum import LowRankSum

SHAPES = {"q": (24, 20), "mlp": (30, 16)}
RTOL = 2e-5


def _update(gen, ranks, n, *, alpha=16.0, scale=1.0, rslora=False, cid=None):
    factors = {}
    for m, (o, i) in SHAPES.items():
        r = ranks[m] if isinstance(ranks, dict) else ranks
        factors[m] = (torch.randn(r, i, generator=gen), scale * torch.randn(o, r, generator=gen))
    return ClientUpdate(factors, num_examples=n, alpha=alpha, client_id=cid, rslora=rslora)


def _round(gen, ranks, sizes, **kw):
    return [_update(gen, r, n, cid=f"c{k}", **kw) for k, (r, n) in enumerate(zip(ranks, sizes))]


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(x.double() - ref.double()) / max(float(torch.linalg.norm(ref.double())), 1e-30))


def _stream(agg: Aggregator, updates, previous, order, ranks=None) -> GlobalState:
    acc = agg.begin_round(previous, ranks=ranks)
    for i in order:
        acc.add(updates[i])
    return acc.finish()


def _assert_same(a: GlobalState, b: GlobalState) -> None:
    assert a.round == b.round and a.aggregator == b.aggregator and a.shapes == b.shapes
    assert a.extra == b.extra
    for m in a.modules:
        assert _rel(a.dense(m), b.dense(m)) <= RTOL, m
        if a.modules[m].svd is not None:
            sa, sb = a.modules[m].svd.S.double(), b.modules[m].svd.S.double()
            assert sa.shape == sb.shape
            assert torch.allclose(sa, sb, rtol=0, atol=RTOL * float(sb[0]))
        else:
            assert a.modules[m].A.shape == b.modules[m].A.shape and a.modules[m].scale == b.modules[m].scale


CASES = {
    "flexlora": ({"max_rank": 8}, [2, 5, 8, 5, 2]),
    "flexlora-full": ({}, [2, 5, 8, 5, 2]),
    "flexlora-server-memory": ({"max_rank": 8, "remedy": "server-memory"}, [2, 5, 8, 5, 2]),
    "flexlora-rank-partitioned": ({"max_rank": 8, "remedy": "rank-partitioned"}, [2, 5, 8, 5, 2]),
    "flexlora-compressing": ({"max_rank": 8, "stream_bound": 7}, [2, 5, 8, 5, 2]),
    "fedavg": ({}, [4, 4, 4, 4, 4]),
    "hetlora": ({}, [2, 5, 8, 5, 2]),
    "hetlora-size": ({"weighting": "size"}, [2, 5, 8, 5, 2]),
    "hetlora-norm_size": ({"weighting": "norm_size"}, [2, 5, 8, 5, 2]),
    "flora": ({}, [2, 5, 8, 5, 2]),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(sorted(CASES)), order=st.permutations(range(5)), seed=st.integers(0, 2**16),
       rslora=st.booleans())
def test_streaming_equals_batch_in_any_arrival_order(case, order, seed, rslora):
    opts, ranks = CASES[case]
    name = case.split("-")[0]
    agg = get_aggregator(name, **opts)
    gen = torch.Generator().manual_seed(seed)
    sizes = [3, 1, 4, 1, 5]
    first = _round(gen, ranks, sizes, rslora=rslora)
    previous = agg.aggregate(first)
    updates = _round(gen, ranks, sizes, scale=0.5, rslora=rslora)
    planned = [{m: (r[m] if isinstance(r, dict) else r) for m in SHAPES} for r in ranks]
    for prev in (None, previous):
        batch = agg.aggregate(updates, previous=prev)
        _assert_same(_stream(agg, updates, prev, list(order), ranks=planned), batch)


def test_many_clients_turn_the_running_sum_dense_and_still_match():
    # 12 clients of rank 8 stack to 96 columns, past min(out, in) = 16 and 20: the sums go dense.
    gen = torch.Generator().manual_seed(7)
    updates = _round(gen, [8] * 12, list(range(1, 13)))
    for name, opts in (("flexlora", {"max_rank": 8}), ("flora", {}), ("flexlora", {"remedy": "server-memory"})):
        agg = get_aggregator(name, **opts)
        acc = agg.begin_round(None)
        for u in updates:
            acc.add(u)
        running = acc.sums["q"] if name == "flora" else acc.sums["q"][0]
        assert running.is_dense and running.terms == 12
        _assert_same(acc.finish(), agg.aggregate(updates))


def test_rank_partitioned_streams_with_planned_ranks_and_refuses_others():
    gen = torch.Generator().manual_seed(8)
    agg = get_aggregator("flexlora", remedy="rank-partitioned")
    updates = _round(gen, [2, 8, 5], [2, 3, 4])
    # A superset of the ranks that reply (a planned client of rank 3 dropped out) changes nothing.
    planned = [{m: r for m in SHAPES} for r in (2, 8, 5, 3)]
    _assert_same(_stream(agg, updates, None, [2, 0, 1], ranks=planned), agg.aggregate(updates))
    acc = agg.begin_round(None, ranks=[{m: r for m in SHAPES} for r in (2, 8)])
    acc.add(updates[0])
    with pytest.raises(AggregationError, match="rank 5 is not among the ranks"):
        acc.add(updates[2])
    # Without planned ranks it buffers (exact, not memory-bounded).
    assert isinstance(agg.begin_round(None), BufferedAccumulator)


def test_a_bad_update_is_refused_by_its_position_and_leaves_the_aggregate_untouched():
    gen = torch.Generator().manual_seed(9)
    updates = _round(gen, [2, 5, 8], [1, 2, 3])
    bad = _update(gen, 4, 2, cid="nan")
    bad.factors["q"][1][0, 0] = math.nan
    wrong = ClientUpdate({"q": (torch.randn(2, 20), torch.randn(25, 2)), "mlp": updates[0].factors["mlp"]},
                         num_examples=1)
    agg = get_aggregator("flexlora")
    acc = agg.begin_round(None)
    acc.add(updates[0])
    with pytest.raises(AggregationError, match=r"client 1 \('nan'\), module 'q': factor B holds NaN"):
        acc.add(bad)
    with pytest.raises(AggregationError, match=r"module 'q': shape \(25, 20\).*differs from \(24, 20\)"):
        acc.add(wrong)
    with pytest.raises(AggregationError, match="modules differ"):
        acc.add(ClientUpdate({"q": updates[1].factors["q"]}, num_examples=1))
    acc.add(updates[1])
    acc.add(updates[2])
    _assert_same(acc.finish(), agg.aggregate(updates))
    with pytest.raises(AggregationError, match="finished"):
        acc.add(updates[0])
    with pytest.raises(AggregationError, match="empty round"):
        agg.begin_round(None).finish()
    fedavg = get_aggregator("fedavg").begin_round(None)
    fedavg.add(updates[0])
    with pytest.raises(AggregationError, match="mixed ranks"):
        fedavg.add(updates[1])


def test_an_aggregator_without_its_own_accumulator_is_buffered():
    class Plain(Aggregator):
        name = "plain"

        def aggregate(self, updates, previous=None):
            return get_aggregator("flexlora").aggregate(updates, previous)

    gen = torch.Generator().manual_seed(10)
    updates = _round(gen, [2, 5], [1, 2])
    acc = Plain().begin_round(None)
    assert isinstance(acc, BufferedAccumulator)
    for u in updates:
        acc.add(u)
    _assert_same(acc.finish(), get_aggregator("flexlora").aggregate(updates))


def test_aggregate_is_the_fold_in_list_order_bit_for_bit():
    """``aggregate`` is the streaming fold run over the list (one implementation per aggregator):
    in the list's own order every tensor of the result is identical, not merely close."""
    gen = torch.Generator().manual_seed(12)
    for name, (kw, ranks) in CASES.items():
        updates = _round(gen, ranks, [3, 1, 4, 1, 5])
        agg = get_aggregator(name.split("-")[0], **kw)
        first = agg.aggregate(updates)
        previous = first if "server-memory" in name or name == "flora" else None
        batch = agg.aggregate(updates, previous)
        stream = _stream(agg, updates, previous, range(5), ranks=[{m: r for m in SHAPES} for r in ranks])
        _assert_identical(batch.state_dict(), stream.state_dict(), name)


def _assert_identical(a, b, where) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_add_checked_keeps_the_checks_across_clients():
    """A server that validated each reply on arrival folds it with ``add_checked``: the per-update
    checks are not run again, but those across the round's clients still are."""
    gen = torch.Generator().manual_seed(13)
    updates = _round(gen, [2, 5, 8], [1, 2, 3])
    agg = get_aggregator("flexlora")
    acc = agg.begin_round(None)
    acc.add_checked(updates[0], {m: SHAPES[m] for m in updates[0].factors})
    with pytest.raises(AggregationError, match="twice|same"):
        acc.add_checked(updates[0], {m: SHAPES[m] for m in updates[0].factors})
    with pytest.raises(AggregationError, match=r"module 'q': shape \(25, 20\).*differs from \(24, 20\)"):
        acc.add_checked(updates[1], {"q": (25, 20), "mlp": SHAPES["mlp"]})
    with pytest.raises(AggregationError, match="modules differ"):
        acc.add_checked(updates[1], {"q": SHAPES["q"]})
    for u in updates[1:]:
        acc.add_checked(u, {m: SHAPES[m] for m in u.factors})
    _assert_same(acc.finish(), agg.aggregate(updates))
    with pytest.raises(AggregationError, match="finished"):
        acc.add_checked(updates[0], SHAPES)


def test_an_aggregator_defining_neither_half_is_refused_by_name():
    class Empty(Aggregator):
        name = "empty"

    gen = torch.Generator().manual_seed(14)
    with pytest.raises(NotImplementedError, match="Empty must implement begin_round"):
        Empty().aggregate(_round(gen, [2], [1]))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), bound=st.integers(1, 12), ranks=st.lists(st.integers(1, 6), min_size=1,
                                                                             max_size=12),
       low_rank=st.booleans())
def test_low_rank_sum_is_the_exact_sum_in_bounded_memory(seed, bound, ranks, low_rank):
    out_f, in_f = 14, 11
    gen = torch.Generator().manual_seed(seed)
    # low_rank: every term's columns lie in span(e_1, e_2, e_3), exactly also in float32, so an
    # exact compression really shrinks the stack.
    basis = torch.zeros(out_f, 3, dtype=torch.float64)
    basis[:3] = torch.eye(3, dtype=torch.float64)
    lsum = LowRankSum((out_f, in_f), bound=bound)
    ref = torch.zeros(out_f, in_f, dtype=torch.float64)
    for r in ranks:
        B = basis @ torch.randn(3, r, generator=gen, dtype=torch.float64) if low_rank else \
            torch.randn(out_f, r, generator=gen, dtype=torch.float64)
        A = torch.randn(r, in_f, generator=gen, dtype=torch.float64)
        before = lsum.compressions
        lsum.add(B.float(), A.float())
        ref += B.float().double() @ A.float().double()
        if low_rank and lsum.compressions > before and not lsum.is_dense:
            assert lsum.width <= 3 + r  # a compression keeps the 3 nonzero directions (+ the newest term)
        # Never more than the bound plus the newest term's columns, or the dense matrix.
        assert lsum.is_dense or lsum.width <= min(bound, min(out_f, in_f)) + r
        assert lsum.nbytes <= 4 * max(out_f * in_f, (min(bound, 11) + 6) * (out_f + in_f))
    assert _rel(lsum.dense(), ref) <= 1e-5
    assert lsum.terms == len(ranks)
    if low_rank and 6 <= bound < min(out_f, in_f) and sum(ranks) > bound:
        assert lsum.compressions >= 1 and not lsum.is_dense
