"""SLoRA's stage-1 maths: nested seeded masks, the weighted sparse average against a dense
reference, and the stage-2 start as the best rank-r approximation of the stage-1 change."""

from __future__ import annotations

import pytest
import torch

from flexlora.core.aggregators import get_aggregator
from flexlora.core.sparse import (
    SparseUpdate,
    aggregate_sparse,
    dense_change,
    lora_share,
    mask_counts,
    mask_prefix,
    stage2_state,
)
from flexlora.core.types import AggregationError, lora_scaling

SHAPES = {"q": (12, 10), "up": (16, 6)}


def test_masks_are_seeded_nested_and_distinct_per_module() -> None:
    a = mask_prefix("q", (12, 10), 30, seed=3)
    b = mask_prefix("q", (12, 10), 90, seed=3)
    assert torch.equal(b[:30], a) and len(set(b.tolist())) == 90 and int(b.max()) < 120
    assert not torch.equal(mask_prefix("q", (12, 10), 30, seed=4), a)
    assert not torch.equal(mask_prefix("k", (12, 10), 30, seed=3), a)


def test_lora_share_and_counts() -> None:
    # rank 2 on 12 x 10: 2 * (12 + 10) / 120 of the entries, rounded up.
    assert lora_share(2, (12, 10)) == pytest.approx(44 / 120)
    assert mask_counts({"q": (12, 10)}, {"q": 44 / 120}) == {"q": 44}
    assert lora_share(50, (12, 10)) == 1.0
    with pytest.raises(AggregationError, match="density"):
        mask_counts({"q": (12, 10)}, 0.0)


def test_sparse_average_equals_the_dense_average_of_the_changes() -> None:
    g = torch.Generator().manual_seed(0)
    big = {"q": 80, "up": 60}
    small = {"q": 25, "up": 40}
    prev = {m: torch.randn(k, generator=g) for m, k in big.items()}
    ups = [SparseUpdate({m: torch.randn(k, generator=g) for m, k in c.items()}, n, f"c{i}")
           for i, (c, n) in enumerate([(big, 3), (small, 1), (small, 4)])]
    got = aggregate_sparse(ups, big, previous=prev)
    for m, shape in SHAPES.items():
        want = dense_change(m, shape, prev[m], 7) + sum(
            (u.num_examples / 8) * dense_change(m, shape, u.values[m], 7) for u in ups)
        assert torch.allclose(dense_change(m, shape, got[m], 7), want, atol=1e-6)
    bad = SparseUpdate({"q": torch.full((25,), float("nan")), "up": torch.zeros(40)}, 1, "bad")
    with pytest.raises(AggregationError, match="NaN"):
        aggregate_sparse([bad], big)


@pytest.mark.parametrize("then", ["flexlora", "fedit"])
def test_stage2_starts_from_the_best_rank_r_approximation(then: str) -> None:
    g = torch.Generator().manual_seed(1)
    change = {m: torch.randn(s[0] * s[1] // 2, generator=g) for m, s in SHAPES.items()}
    r = 3
    state = stage2_state(change, SHAPES, 5, then=then, max_rank=6 if then == "flexlora" else r, alpha=16.0)
    agg = get_aggregator(then, **({"max_rank": 6} if then == "flexlora" else {}))
    got = agg.distribute(state, r, 16.0)
    for m, shape in SHAPES.items():
        d = dense_change(m, shape, change[m], 5).double()
        U, S, Vh = torch.linalg.svd(d)
        best = (U[:, :r] * S[:r]) @ Vh[:r]
        a, b = got[m]
        assert a.shape == (r, shape[1]) and b.shape == (shape[0], r)
        assert torch.allclose(lora_scaling(16.0, r) * (b.double() @ a.double()), best, atol=1e-5)
