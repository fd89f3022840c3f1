"""The Cholesky path of ``svd_of_product`` (method="cholesky", opt-in).

Independent expectations: the float64 SVD of the dense product (Eckart-Young: the kept triplets
must be as good as the best rank-k approximation), orthonormality of the returned bases, and a
naive ``X.T @ X`` for the blocked Gram.
"""

from __future__ import annotations

import pytest
import torch

from flexlora.core import lowrank
from flexlora.core.lowrank import gram_matrix, relative_error, svd_of_product

RANKS = (8, 30, 200, 8, 30, 200, 8)  # R = 484


def _round(gen, out_f, in_f, noise, decades=3.0):
    """Clients of RANKS that received the top r directions of one global update of rank 200
    (singular values decaying over ``decades``) and moved by ``noise`` relative to their factors;
    the client weights folded into B, as the aggregators do."""
    sv = torch.logspace(0, -decades, 200, dtype=torch.float64).sqrt()
    qb, _ = torch.linalg.qr(torch.randn(out_f, 200, generator=gen, dtype=torch.float64))
    qa, _ = torch.linalg.qr(torch.randn(in_f, 200, generator=gen, dtype=torch.float64))
    gb, ga = qb * sv, (qa * sv).T
    tot = sum(range(1, len(RANKS) + 1))
    Bs, As = [], []
    for k, r in enumerate(RANKS):
        db = torch.randn(out_f, r, generator=gen, dtype=torch.float64) / out_f**0.5
        da = torch.randn(r, in_f, generator=gen, dtype=torch.float64) / in_f**0.5
        Bs.append((k + 1) / tot * (gb[:, :r] + noise * db))
        As.append(ga[:r] + noise * da)
    return torch.cat(Bs, 1).float(), torch.cat(As, 0).float()


def _best(B, A, k):
    U, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k], S[:k]


def _check(res, B, A, k, tol):
    best, S_ref = _best(B, A, k)
    eye = torch.eye(k, dtype=torch.float64)
    assert float((res.U.double().T @ res.U.double() - eye).abs().max()) <= tol
    assert float((res.V.double().T @ res.V.double() - eye).abs().max()) <= tol
    assert float((res.S.double() - S_ref).abs().max()) <= tol * float(S_ref[0])
    assert relative_error(res.dense(), best) <= tol


@pytest.mark.parametrize("noise,expected", [(0.0, "qr"), (1e-6, "qr"), (1e-3, "qr"), (3e-2, "cholesky"),
                                            (1e-1, "cholesky"), (1.0, "cholesky")])
@pytest.mark.parametrize("decades", [0.0, 3.0, 6.0])
def test_holds_1e5_on_nearly_collinear_rounds_and_falls_back_where_it_must(gen, noise, expected, decades):
    B, A = _round(gen, 800, 700, noise, decades)
    res = svd_of_product(B, A, method="cholesky", max_rank=200)
    assert res.method == expected
    _check(res, B, A, 200, 1e-5)


def test_is_more_accurate_than_householder_float32(gen):
    B, A = _round(gen, 800, 700, 1e-1, 6.0)
    best, _ = _best(B, A, 200)
    chol = svd_of_product(B, A, method="cholesky", max_rank=200)
    assert chol.method == "cholesky"
    qr = svd_of_product(B, A, method="qr", max_rank=200)
    assert relative_error(chol.dense(), best) < relative_error(qr.dense(), best)


def test_gives_way_when_only_the_head_rows_are_checked(gen, monkeypatch):
    # A repeated client: the Gram is singular already in the first 1.25 R rows, so the path
    # gives up before it forms the rest (the tail Gram is never computed).
    B, A = _round(gen, 900, 700, 1e-1)
    B = torch.cat([B, B[:, :30]], 1)
    A = torch.cat([A, A[:30]], 0)
    calls = []
    real = lowrank.gram_matrix
    monkeypatch.setattr(lowrank, "gram_matrix", lambda X, **kw: calls.append(tuple(X.shape)) or real(X, **kw))
    res = svd_of_product(B, A, method="cholesky", max_rank=200)
    assert res.method == "qr"
    R = B.shape[1]
    assert calls == [(R + R // 4 + 8, R)]
    _check(res, B, A, 200, 1e-5)


def test_numerically_zero_directions_get_an_orthonormal_completion(gen):
    # rank 40 in a stack of 60 columns: well conditioned per client, 20 exact zeros in the product
    B0 = torch.randn(80, 40, generator=gen)
    A0 = torch.randn(40, 70, generator=gen)
    B = torch.cat([B0, torch.randn(80, 20, generator=gen)], 1)
    A = torch.cat([A0, torch.zeros(20, 70)], 0)
    res = svd_of_product(B, A, method="cholesky")
    assert res.method == "cholesky" and res.S.shape == (60,)
    assert float(res.S[40:].abs().max()) == 0.0
    _check(res, B, A, 60, 1e-5)
    assert relative_error(res.dense(), B.double() @ A.double()) <= 1e-5


def test_all_zero_update_falls_back_to_householder():
    res = svd_of_product(torch.zeros(30, 4), torch.zeros(4, 20), method="cholesky")
    assert res.method == "qr" and float(res.S.abs().max()) == 0.0


def test_client_weights_scaling_whole_columns_do_not_force_a_fallback(gen):
    # Columns scaled over six decades (weights times alpha/r): unscaled, the Gram's Cholesky
    # diagonal spans far more than CHOLESKY_MAX_COND; equilibrated it is well conditioned.
    B, A = _round(gen, 900, 700, 1.0)
    scale = torch.logspace(-3, 3, B.shape[1])
    B = B * scale
    res = svd_of_product(B, A, method="cholesky", max_rank=200)
    assert res.method == "cholesky"
    _check(res, B, A, 200, 1e-5)


def test_float64_inputs_stay_float64(gen):
    B, A = _round(gen, 300, 250, 1e-1)
    B, A = B[:, :60].double(), A[:60].double()
    res = svd_of_product(B, A, method="cholesky")
    assert res.U.dtype == torch.float64 and res.method == "cholesky"
    _check(res, B, A, 60, 1e-7)


@pytest.mark.parametrize("R,blocks", [(1, None), (7, 3), (128, None), (300, None), (301, 3), (301, 5), (50, 1)])
def test_blocked_gram_equals_the_plain_product(gen, R, blocks):
    X = torch.randn(90, R, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(gram_matrix(X, blocks=blocks), X.T @ X, rtol=1e-12, atol=1e-12)
    Xt = X.T.contiguous().T  # column-major, as the stacked B is
    torch.testing.assert_close(gram_matrix(Xt, blocks=blocks), X.T @ X, rtol=1e-12, atol=1e-12)



def test_auto_keeps_householder(gen):
    B, A = _round(gen, 800, 700, 1e-1)
    assert svd_of_product(B, A, max_rank=200).method == "qr"
