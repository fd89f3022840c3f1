"""The library used the wrong way: every misuse is a clear AggregationError/ValueError naming the
problem, never a torch error from deep inside or a silent wrong result, and the caller's tensors
are never read after the call returns (a caller may reuse its buffers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexlora.core import AggregationError, ClientUpdate, get_aggregator
from flexlora.core.aggregators.hetlora import pruned_ranks, rank_pruning_penalty
from flexlora.core.types import lora_scaling

SHAPES = {"q": (12, 10), "v": (9, 11)}
NAMES = ("flexlora", "fedavg", "hetlora", "flora")


def _round(helpers, ranks=(3, 3, 3), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [helpers.make_update(gen, SHAPES, r, num_examples=5 + i, client_id=f"c{i}") for i, r in enumerate(ranks)]


@pytest.mark.parametrize("name,options", [("flexlora", {}), ("flora", {}), ("fedavg", {}), ("hetlora", {}),
                                          ("flexlora", {"remedy": "rank-partitioned"})])  # buffered: no ranks
def test_streaming_does_not_keep_the_callers_tensors(helpers, name, options) -> None:
    ups = _round(helpers)
    want = get_aggregator(name, **options).aggregate(ups)
    acc = get_aggregator(name, **options).begin_round()
    for u in ups:
        acc.add(u)
        for a, b in u.factors.values():  # the caller reuses its buffers once add() returned
            a.zero_()
            b.zero_()
    got = acc.finish()
    for m in SHAPES:
        ref = want.dense(m).double()
        assert float((got.dense(m).double() - ref).norm()) <= 1e-5 * float(ref.norm()), m


def test_a_rank_above_max_rank_is_refused_not_padded(helpers) -> None:
    ups = _round(helpers)  # R = 9 per module, so the state truncated to 3 lacks directions
    agg = get_aggregator("flexlora", max_rank=3)
    state = agg.aggregate(ups)
    with pytest.raises(AggregationError, match=r"rank 5 requested, but this FlexLoRA keeps only max_rank = 3"):
        agg.distribute(state, 5)
    agg.distribute(state, 3)
    # Without max_rank, a rank above the update's own rank is exact: its extra directions are zero.
    small = get_aggregator("flexlora")
    one = small.aggregate(_round(helpers, ranks=(1,)))
    a, b = small.distribute(one, 4)["q"]
    assert float(((16.0 / 4) * b @ a - one.dense("q")).norm()) <= 1e-5 * float(one.dense("q").norm())


@pytest.mark.parametrize("name", NAMES)
def test_finish_twice_says_the_round_is_finished(helpers, name) -> None:
    acc = get_aggregator(name).begin_round()
    acc.add(_round(helpers)[0])
    acc.finish()
    with pytest.raises(AggregationError, match="already finished"):
        acc.finish()


def test_a_refused_first_update_leaves_the_rank_partitioned_round_empty(helpers) -> None:
    gen = torch.Generator().manual_seed(3)
    acc = get_aggregator("flexlora", remedy="rank-partitioned").begin_round(ranks=[{"q": 3, "k": 3}, {"q": 6, "k": 6}])
    with pytest.raises(AggregationError, match="rank 4 is not among the ranks"):
        acc.add(helpers.make_update(gen, {"q": (12, 10)}, 4))
    # Another module set is now accepted as the round's first update.
    acc.add(helpers.make_update(gen, {"k": (8, 8)}, 3))
    acc.add(helpers.make_update(gen, {"k": (8, 8)}, 6))
    assert set(acc.finish().modules) == {"k"}


@pytest.mark.parametrize("tensor,match", [
    (torch.ones(3, 10, dtype=torch.int64), "dtype torch.int64"),
    (torch.ones(3, 10, dtype=torch.complex64), "dtype torch.complex64"),
    (torch.ones(3, 10, dtype=torch.bool), "dtype torch.bool"),
    (torch.empty(3, 10, device="meta"), "meta device"),
])
def test_unsupported_tensors_are_named(helpers, tensor, match) -> None:
    b = torch.ones(12, 3)
    for name in NAMES:
        with pytest.raises(AggregationError, match=rf"client 0, module 'q': factor A .*{match}"):
            get_aggregator(name).aggregate([ClientUpdate({"q": (tensor, b)}, 5)])


@pytest.mark.parametrize("bad,match", [
    (lambda u: u, "expected a sequence \\(list\\) of ClientUpdate"),
    (lambda u: [ClientUpdate([u.factors["q"]], 5)], "factors must be a mapping"),
    (lambda u: [ClientUpdate(None, 5)], "factors must be a mapping"),
    (lambda u: [ClientUpdate(u.factors, 10**400)], "num_examples must be a positive integer up to 2\\*\\*53"),
    (lambda u: [u, u], "the same update is already in the round as client 0"),
    (lambda u: [u, ClientUpdate(dict(u.factors), 3, client_id=u.client_id)], "the same client is already"),
])
def test_malformed_rounds_are_named(helpers, bad, match) -> None:
    u = _round(helpers)[0]
    with pytest.raises(AggregationError, match=match):
        get_aggregator("flexlora").aggregate(bad(u))


def test_the_same_client_twice_is_refused_when_streaming(helpers) -> None:
    u = _round(helpers)[0]
    acc = get_aggregator("flexlora").begin_round()
    acc.add(u)
    with pytest.raises(AggregationError, match="the same client is already in the round as client 0"):
        acc.add(ClientUpdate(dict(u.factors), 4, client_id=u.client_id))
    acc.add(ClientUpdate(dict(u.factors), 4, client_id="other"))
    assert acc.count == 2


def test_distribute_and_previous_need_a_global_state(helpers) -> None:
    ups = _round(helpers)
    svd_state = get_aggregator("flexlora").aggregate(ups)
    for name in ("hetlora", "fedavg"):
        with pytest.raises(AggregationError, match=rf"{name}.distribute needs a state of factors"):
            get_aggregator(name).distribute(svd_state, 3)
    for name in NAMES:
        with pytest.raises(AggregationError, match="distribute needs the GlobalState that aggregate\\(\\) returned"):
            get_aggregator(name).distribute(None, 3)
        with pytest.raises(AggregationError, match="previous must be the GlobalState of the last round"):
            get_aggregator(name).aggregate(ups, previous={})
        with pytest.raises(AggregationError, match="previous must be the GlobalState of the last round"):
            get_aggregator(name).begin_round({})
    # A FlexLoRA aggregator can distribute any state: it takes the state's SVD.
    fed_state = get_aggregator("fedavg").aggregate(ups)
    a, b = get_aggregator("flexlora").distribute(fed_state, 3)["q"]
    assert a.shape == (3, 10) and b.shape == (12, 3)


def test_numpy_ranks_are_accepted(helpers) -> None:
    agg = get_aggregator("flexlora")
    state = agg.aggregate(_round(helpers))
    a, b = agg.distribute(state, np.int64(4))["q"]
    assert a.shape == (4, 10)


@pytest.mark.parametrize("name,options,match", [
    ("flora", {"accumulate": "false"}, "accumulate must be True or False"),
    ("flexlora", {"oversample": -50}, "oversample must be a non-negative int"),
    ("flexlora", {"power_iters": 1.5}, "power_iters must be a non-negative int"),
    ("flexlora", {"seed": "a"}, "seed must be an int"),
    ("flexlora", {"dense_threshold": "0.5"}, "dense_threshold must be a number in \\(0, 1\\]"),
])
def test_aggregator_options_are_checked_when_made(name, options, match) -> None:
    with pytest.raises(AggregationError, match=match):
        get_aggregator(name, **options)


@pytest.mark.parametrize("name", NAMES)
def test_inputs_that_require_grad_leave_no_graph(helpers, name) -> None:
    ups = _round(helpers)
    live = [ClientUpdate({m: (a.clone().requires_grad_(), (b * 2).requires_grad_()) for m, (a, b) in u.factors.items()},
                         u.num_examples, client_id=u.client_id) for u in ups]
    agg = get_aggregator(name)
    for state in (agg.aggregate(live), _streamed(agg, live)):
        tensors = [t for st in state.modules.values() for t in st.tensors().values()]
        assert tensors and not any(t.requires_grad or t.grad_fn is not None for t in tensors)
        a, b = agg.distribute(state, 3)["q"]
        assert not (a.requires_grad or b.requires_grad)


def _streamed(agg, updates):
    acc = agg.begin_round()
    for u in updates:
        acc.add(u)
    return acc.finish()


def test_pruning_helpers_check_their_input() -> None:
    a, b = torch.randn(8, 10), torch.randn(12, 8)
    assert pruned_ranks({"q": (a, b)}, gamma=0.9) == {"q": 8}  # a dense tail is kept
    with pytest.raises(ValueError, match=r"expected \(A: r x in, B: out x r\)"):
        pruned_ranks({"q": (b, a)}, gamma=0.9)
    with pytest.raises(ValueError, match=r"expected \(A: r x in, B: out x r\)"):
        rank_pruning_penalty({"q": (a, b[:, :7])})
    for gamma in (-1, 0.0, float("nan"), 1.5, True):
        with pytest.raises(ValueError, match="gamma must be in"):
            pruned_ranks({"q": (a, b)}, gamma=gamma)
    with pytest.raises(ValueError, match="threshold must be a non-negative number"):
        pruned_ranks({"q": (a, b)}, threshold=-1)


def test_lora_scaling_checks_its_arguments() -> None:
    assert lora_scaling(16, 4) == 4.0 and lora_scaling(16, 4, True) == 8.0
    for args, match in (((16, 0), "rank must be a positive int"), ((16, 2.5), "rank must be a positive int"),
                        ((-1, 4), "alpha must be a positive finite number"),
                        ((float("nan"), 4), "alpha must be a positive finite number")):
        with pytest.raises(ValueError, match=match):
            lora_scaling(*args)
    with pytest.raises(ValueError, match="rslora must be True or False"):
        lora_scaling(16, 4, "yes")  # type: ignore[arg-type]


def test_streaming_tells_a_repeated_update_from_a_new_one_at_a_reused_address(helpers) -> None:
    # Replies are freed once folded, so a new reply may live where an old one did: it is not a repeat.
    gen = torch.Generator().manual_seed(5)
    acc = get_aggregator("flexlora").begin_round()
    for _ in range(20):
        acc.add(helpers.make_update(gen, SHAPES, 2))
    assert acc.count == 20
    u = helpers.make_update(gen, SHAPES, 2)
    acc.add(u)
    with pytest.raises(AggregationError, match="the same update is already in the round as client 20"):
        acc.add(u)


@pytest.mark.parametrize("name", NAMES)
def test_a_round_mixing_float64_with_float32_is_refused_in_either_order(helpers, name) -> None:
    gen = torch.Generator().manual_seed(9)
    f32 = helpers.make_update(gen, SHAPES, 3, client_id="a")
    f64 = helpers.make_update(gen, SHAPES, 3, client_id="b", dtype=torch.float64)
    for pair in ((f32, f64), (f64, f32)):
        with pytest.raises(AggregationError, match=r"client 1 \('.'\), module 'q': its factors are .*give every client"):
            get_aggregator(name).aggregate(list(pair))
        acc = get_aggregator(name).begin_round()
        acc.add(pair[0])
        with pytest.raises(AggregationError, match="client 1.*the round's first client's are"):
            acc.add(pair[1])
    # bf16 and float32 clients share float32 arithmetic: allowed together.
    bf = helpers.make_update(gen, SHAPES, 3, client_id="c", dtype=torch.bfloat16)
    assert get_aggregator(name).aggregate([f32, bf]).modules["q"].shape == (12, 10)
