"""Batched thin-QR SVDs of many modules (``svd_of_products``) against one call per module and
against the dense product, and the FlexLoRA aggregator with ``batch_modules`` on and off.
(On CPU only: the CUDA path, where ``batch_modules=None`` batches, is untested without a GPU.)"""

from __future__ import annotations

import pytest
import torch

from flexlora.core import lowrank
from flexlora.core.aggregators import get_aggregator
from flexlora.core.lowrank import batches_well, svd_of_product, svd_of_products
from flexlora.core.types import ClientUpdate


def _pair(out_f: int, R: int, in_f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, R, generator=g), torch.randn(R, in_f, generator=g)


def _same(a: lowrank.LowRankSVD, b: lowrank.LowRankSVD) -> bool:
    return torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.V, b.V) and a.method == b.method


def _product_error(a: lowrank.LowRankSVD, b: lowrank.LowRankSVD) -> float:
    """Relative difference of the two factorised matrices (the SVD's factors are unique only up to
    signs and rotations within repeated singular values; the product is unique)."""
    da = (a.U.double() * a.S.double()) @ a.V.double().T
    db = (b.U.double() * b.S.double()) @ b.V.double().T
    return float(torch.linalg.norm(da - db) / torch.linalg.norm(db))


# Odd sizes on purpose: batch members then start at offsets that are not multiples of a cache line.
SHAPES = [(37, 5, 29), (37, 5, 29), (37, 5, 29), (64, 12, 48), (64, 12, 48), (48, 12, 64), (37, 30, 29),
          (20, 3, 50), (37, 5, 29)]


@pytest.mark.parametrize("max_rank", [None, 4])
def test_batched_equals_one_call_per_module_to_float32_rounding(max_rank):
    pairs = [_pair(o, r, i, seed) for seed, (o, r, i) in enumerate(SHAPES)]
    batched = svd_of_products(pairs, batch=True, max_rank=max_rank)
    assert all(_same(a, b) for a, b in zip(batched, svd_of_products(pairs, batch=True, max_rank=max_rank)))
    for (B, A), got in zip(pairs, batched):
        want = svd_of_product(B, A, max_rank=max_rank)
        assert got.method == want.method and got.S.shape == want.S.shape
        assert _product_error(got, want) < 1e-6
        assert torch.allclose(got.S, want.S, rtol=1e-6, atol=1e-6 * float(want.S[0]))
        # and it is the SVD of the product (independent reference: the dense matrix)
        dense = B.double() @ A.double()
        if max_rank is None:
            rec = (got.U.double() * got.S.double()) @ got.V.double().T
            assert float(torch.linalg.norm(rec - dense) / torch.linalg.norm(dense)) < 1e-5
        s_ref = torch.linalg.svdvals(dense)[: got.S.shape[0]]
        assert torch.allclose(got.S.double(), s_ref, rtol=1e-5, atol=1e-5 * float(s_ref[0]))


def test_results_keep_their_order_and_own_their_storage():
    pairs = [_pair(o, r, i, seed) for seed, (o, r, i) in enumerate(SHAPES)]
    got = svd_of_products(pairs, batch=True)
    assert [(g.U.shape[0], g.V.shape[0]) for g in got] == [(o, i) for o, _, i in SHAPES]
    for g in got:  # a view into the batch would make torch.save write the whole batch
        assert g.U.untyped_storage().nbytes() == g.U.numel() * g.U.element_size()
        assert g.V.untyped_storage().nbytes() == g.V.numel() * g.V.element_size()


def test_groups_split_at_the_byte_bound_give_the_same_results(monkeypatch):
    pairs = [_pair(37, 5, 29, seed) for seed in range(7)]
    whole = svd_of_products(pairs, batch=True)
    calls = []
    real = lowrank._qr_triplets
    monkeypatch.setattr(lowrank, "_qr_triplets", lambda B, A, k: calls.append(B.shape[0]) or real(B, A, k))
    monkeypatch.setattr(lowrank, "BATCH_MAX_BYTES", 3 * (37 + 29) * 5 * 4)  # three pairs per call
    split = svd_of_products(pairs, batch=True)
    assert calls == [3, 3, 1]
    assert all(_product_error(a, b) < 1e-6 for a, b in zip(whole, split))


def test_policy_batches_the_qr_path_only_and_on_cpu_only_on_request():
    B, A = _pair(60, 8, 60, 0)
    assert not batches_well(B, A)  # None: CUDA only
    assert batches_well(B, A, batch=True)
    assert not batches_well(B, A, batch=False)
    wide_b, wide_a = _pair(40, 36, 40, 0)  # R > 0.85 * 40: the dense path, never batched
    assert not batches_well(wide_b, wide_a, batch=True)
    assert not batches_well(B, A, method="cholesky", batch=True)
    assert batches_well(B, A, method="qr", batch=True)


def test_products_that_do_not_batch_take_the_single_path(monkeypatch):
    calls = []
    real = lowrank._qr_triplets
    monkeypatch.setattr(lowrank, "_qr_triplets", lambda B, A, k: calls.append(tuple(B.shape)) or real(B, A, k))
    pairs = [_pair(40, 36, 40, s) for s in range(3)] + [_pair(37, 5, 29, s) for s in range(2)]
    got = svd_of_products(pairs, batch=True)
    assert [g.method for g in got] == ["dense"] * 3 + ["qr"] * 2
    assert calls == [(2, 37, 5)]  # the two narrow ones, in one call


def _round(seed: int, ranks: list[int], shapes: dict[str, tuple[int, int]]) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    ups = []
    for k, r in enumerate(ranks):
        factors = {m: (torch.randn(r, i, generator=g), torch.randn(o, r, generator=g)) for m, (o, i) in shapes.items()}
        ups.append(ClientUpdate(client_id=f"c{k}", factors=factors, num_examples=3 + k, alpha=16.0))
    return ups


SHAPES_BY_MODULE = {f"l{layer}.{m}": shape for layer in range(3)
                    for m, shape in (("q", (48, 48)), ("k", (16, 48)), ("up", (96, 48)), ("down", (48, 96)))}


@pytest.mark.parametrize("remedy", ["none", "server-memory", "rank-partitioned"])
def test_flexlora_batched_equals_unbatched_batch_and_streaming(remedy, monkeypatch):
    batched_calls = []
    real = lowrank._qr_triplets
    monkeypatch.setattr(lowrank, "_qr_triplets",
                        lambda B, A, k: (B.ndim == 3 and batched_calls.append(B.shape[0])) or real(B, A, k))
    ranks = [2, 4, 8]
    agg_on = get_aggregator("flexlora", batch_modules=True, remedy=remedy)
    agg_off = get_aggregator("flexlora", batch_modules=False, remedy=remedy)
    prev = None
    for rnd in range(2):
        ups = _round(rnd, ranks, SHAPES_BY_MODULE)
        on = agg_on.aggregate(ups, prev)
        off = agg_off.aggregate(ups, prev)
        plan = [dict.fromkeys(SHAPES_BY_MODULE, r) for r in ranks]
        acc = agg_on.begin_round(prev, ranks=plan)
        for u in reversed(ups):
            acc.add(u)
        streamed = acc.finish()
        assert list(on.modules) == list(off.modules) == list(streamed.modules) == list(SHAPES_BY_MODULE)
        for m in SHAPES_BY_MODULE:
            a, b = on.modules[m].to_svd(), off.modules[m].to_svd()
            assert _product_error(a, b) < 1e-6
            assert _product_error(streamed.modules[m].to_svd(), b) < 1e-5  # another summation order
        prev = off
    assert batched_calls and max(batched_calls) >= 3  # the three layers' modules of one shape went together


def test_batch_modules_must_be_a_bool_or_none():
    with pytest.raises(Exception, match="batch_modules must be true, false or absent"):
        get_aggregator("flexlora", batch_modules="yes")
