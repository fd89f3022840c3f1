"""Truncated SVD of a sum of low-rank products (method.md section 2, "Computing it fast and exactly")."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlora.core.lowrank import (
    LowRankSVD,
    frobenius_of_product,
    orthonormal_padding,
    relative_error,
    stable_seed,
    svd_of_product,
    truncate_to_factors,
)


def _stack(gen, out_f, in_f, R, dtype=torch.float32):
    B = torch.randn(out_f, R, generator=gen, dtype=torch.float64).to(dtype)
    A = torch.randn(R, in_f, generator=gen, dtype=torch.float64).to(dtype)
    return B, A


def _check_svd(res: LowRankSVD, B, A, k, tol):
    ref = B.double() @ A.double()
    assert res.U.shape == (ref.shape[0], k) and res.S.shape == (k,) and res.V.shape == (ref.shape[1], k)
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(res.U.double().T @ res.U.double(), eye, atol=tol * 10, rtol=0)
    torch.testing.assert_close(res.V.double().T @ res.V.double(), eye, atol=tol * 10, rtol=0)
    S = res.S.double()
    assert bool((S[:-1] >= S[1:] - tol * float(S[0])).all()) and bool((S >= 0).all())
    S_ref = torch.linalg.svdvals(ref)
    torch.testing.assert_close(S, S_ref[:k], atol=tol * float(S_ref[0]), rtol=0)
    # U diag(S) V^T is the best rank-k approximation of B A (all of it when k = rank)
    U, Sr, Vh = torch.linalg.svd(ref, full_matrices=False)
    best = (U[:, :k] * Sr[:k]) @ Vh[:k]
    err = float(torch.linalg.norm(res.dense().double() - ref))
    opt = float(torch.linalg.norm(best - ref))
    assert err <= opt + tol * float(torch.linalg.norm(ref))


@settings(max_examples=40, deadline=None)
@given(
    out_f=st.integers(1, 48),
    in_f=st.integers(1, 48),
    R=st.integers(1, 60),
    method=st.sampled_from(["auto", "cholesky", "gram", "qr", "dense"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 10_000),
)
def test_exact_paths_match_full_svd(out_f, in_f, R, method, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    B, A = _stack(gen, out_f, in_f, R, dtype)
    if method in ("qr", "gram", "cholesky") and R > min(out_f, in_f):
        with pytest.raises(ValueError, match=method):
            svd_of_product(B, A, method=method)
        return
    res = svd_of_product(B, A, method=method)
    assert res.U.dtype == dtype
    if method in ("gram", "cholesky"):  # they may give way to Householder QR when their checks fail
        assert res.method in (method, "qr")
    elif method != "auto":
        assert res.method == method
    k = min(out_f, in_f, R)
    # The Gram paths count singular values below 1e-7 of the largest as zero, so on float64
    # inputs they hold 1e-7, not float64 precision.
    gram64 = res.method in ("gram", "cholesky") and dtype == torch.float64
    _check_svd(res, B, A, k, 1e-5 if dtype == torch.float32 else (1e-7 if gram64 else 1e-11))
    # exact: the full-rank result reproduces B A
    ref = B.double() @ A.double()
    tol = 2e-6 if dtype == torch.float32 else (2e-7 if gram64 else 1e-12)
    assert relative_error(res.dense(), ref) <= tol * max(1, math.sqrt(R))


@pytest.mark.parametrize("method", ["cholesky", "gram", "qr", "dense", "auto"])
def test_max_rank_truncates(gen, method):
    B, A = _stack(gen, 40, 30, 12)
    res = svd_of_product(B, A, method=method, max_rank=5)
    _check_svd(res, B, A, 5, 1e-5)
    assert svd_of_product(B, A, method=method, max_rank=100).S.shape == (12,)


def test_auto_crossover(gen):
    # min(out, in) = 20; 0.85 * 20 = 17
    assert svd_of_product(*_stack(gen, 20, 25, 17), method="auto").method == "qr"
    assert svd_of_product(*_stack(gen, 20, 25, 18), method="auto").method == "dense"
    assert svd_of_product(*_stack(gen, 20, 25, 18), method="auto", dense_threshold=1.0).method == "qr"


def test_rank_deficient_sum_is_exact(gen):
    # B A with R = 10 but true rank 3: trailing singular values are ~0, and the top 3 are exact
    B0, A0 = _stack(gen, 30, 25, 3)
    mix = torch.randn(3, 10, generator=gen)
    B, A = B0 @ mix, torch.linalg.pinv(mix) @ A0
    ref = B.double() @ A.double()
    for method in ("cholesky", "gram", "qr", "dense"):
        res = svd_of_product(B, A, method=method)
        assert res.S.shape == (10,)
        assert float(res.S[3]) <= 1e-5 * float(res.S[0])
        assert relative_error(res.dense(), ref) <= 1e-5


def test_randomized_needs_max_rank_and_is_close_on_decaying_spectrum(gen):
    B, A = _stack(gen, 50, 40, 20)
    with pytest.raises(ValueError, match="max_rank"):
        svd_of_product(B, A, method="randomized")
    # singular values 3^-i: far below sigma_{k+1} after oversampling
    Q1, _ = torch.linalg.qr(torch.randn(50, 20, generator=gen, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(40, 20, generator=gen, dtype=torch.float64))
    s = 3.0 ** -torch.arange(20, dtype=torch.float64)
    B, A = (Q1 * s).float(), Q2.T.float()
    res = svd_of_product(B, A, method="randomized", max_rank=4, generator=torch.Generator().manual_seed(0))
    assert res.method == "randomized" and res.S.shape == (4,)
    torch.testing.assert_close(res.S.double(), s[:4], atol=1e-6, rtol=1e-5)
    best = (Q1[:, :4] * s[:4]) @ Q2[:, :4].T
    assert relative_error(res.dense(), best) <= 1e-5
    # reproducible for a seeded generator
    again = svd_of_product(B, A, method="randomized", max_rank=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.U, res.U)


def test_randomized_is_approximate_on_flat_spectrum(gen):
    # the point of keeping it opt-in: with a flat spectrum and no power iterations, the
    # top-k subspace is missed (error well above the Eckart-Young optimum)
    B, A = _stack(gen, 60, 60, 60)
    exact = svd_of_product(B, A, method="dense", max_rank=3)
    approx = svd_of_product(B, A, method="randomized", max_rank=3, oversample=2, power_iters=0,
                            generator=torch.Generator().manual_seed(1))
    ref = B.double() @ A.double()
    e_exact = float(torch.linalg.norm(exact.dense().double() - ref))
    e_approx = float(torch.linalg.norm(approx.dense().double() - ref))
    assert e_approx > e_exact * (1 + 1e-3)


def test_bad_arguments(gen):
    B, A = _stack(gen, 10, 8, 3)
    with pytest.raises(ValueError, match="unknown SVD method"):
        svd_of_product(B, A, method="lanczos")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs B"):
        svd_of_product(B, A.T)
    with pytest.raises(ValueError, match="needs B"):
        svd_of_product(B[0], A)


def test_half_precision_inputs_upcast(gen):
    B, A = _stack(gen, 16, 12, 4, torch.float16)
    res = svd_of_product(B, A)
    assert res.U.dtype == torch.float32
    assert relative_error(res.dense(), B.double() @ A.double()) <= 1e-5


@pytest.mark.parametrize("split", ["B", "A", "sqrt"])
@pytest.mark.parametrize("alpha", [16.0, 2.5])
def test_truncate_to_factors_is_best_rank_r(gen, split, alpha):
    B0, A0 = _stack(gen, 20, 15, 8, torch.float64)
    res = svd_of_product(B0, A0)
    ref = B0 @ A0
    U, S, Vh = torch.linalg.svd(ref)
    for r in (1, 4, 8):
        A, B = truncate_to_factors(res, r, alpha, split=split)
        assert A.shape == (r, 15) and B.shape == (20, r)
        torch.testing.assert_close((alpha / r) * B @ A, (U[:, :r] * S[:r]) @ Vh[:r], atol=1e-10, rtol=1e-10)
    A, B = truncate_to_factors(res, 3, alpha, split="B")
    torch.testing.assert_close(A @ A.T, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    # paper split: B = U_r S_r r / alpha
    torch.testing.assert_close(B.abs(), (U[:, :3] * S[:3]).abs() * (3 / alpha), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("split", ["B", "A", "sqrt"])
@pytest.mark.parametrize("alpha", [16.0, 2.5])
def test_truncate_to_factors_rslora_is_best_rank_r(gen, split, alpha):
    B0, A0 = _stack(gen, 20, 15, 8, torch.float64)
    res = svd_of_product(B0, A0)
    U, S, Vh = torch.linalg.svd(B0 @ A0)
    for r in (2, 4, 8, 12):  # 12 exceeds the held rank 8: padded, and the update is unchanged
        A, B = truncate_to_factors(res, r, alpha, split=split, rslora=True)
        assert A.shape == (r, 15) and B.shape == (20, r)
        k = min(r, 8)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        torch.testing.assert_close((alpha / math.sqrt(r)) * B @ A, best, atol=1e-10, rtol=1e-10)
        # read with the plain scaling, the same factors are off by sqrt(r), so a truncation that
        # ignored rslora would fail the line above
        assert float(torch.linalg.norm((alpha / r) * B @ A - best)) > 0.1 * float(torch.linalg.norm(best))
    # paper split under rsLoRA: B = U_r S_r sqrt(r) / alpha
    A, B = truncate_to_factors(res, 4, alpha, split="B", rslora=True)
    torch.testing.assert_close(B.abs(), (U[:, :4] * S[:4]).abs() * (2 / alpha), atol=1e-10, rtol=1e-8)


def test_truncate_beyond_held_rank_pads(gen):
    B0, A0 = _stack(gen, 20, 15, 4, torch.float64)
    res = svd_of_product(B0, A0)
    A, B = truncate_to_factors(res, 9, 16.0, pad_seed=5)
    assert A.shape == (9, 15) and B.shape == (20, 9)
    torch.testing.assert_close(A @ A.T, torch.eye(9, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.count_nonzero(B[:, 4:]) == 0
    torch.testing.assert_close((16.0 / 9) * B @ A, B0 @ A0, atol=1e-10, rtol=1e-10)
    A2, _ = truncate_to_factors(res, 9, 16.0, pad_seed=5)
    torch.testing.assert_close(A2, A)  # seeded
    A3, _ = truncate_to_factors(res, 9, 16.0, pad_seed=6)
    assert not torch.allclose(A3[4:], A[4:])
    with pytest.raises(ValueError, match="split"):
        truncate_to_factors(res, 2, 16.0, split="C")  # type: ignore[arg-type]


def test_orthonormal_padding(gen):
    V, _ = torch.linalg.qr(torch.randn(12, 4, generator=gen, dtype=torch.float64))
    P = orthonormal_padding(V, 5, seed=3)
    assert P.shape == (12, 5)
    torch.testing.assert_close(P.T @ P, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(V.T @ P, torch.zeros(4, 5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(orthonormal_padding(V, 5, seed=3), P)
    full = orthonormal_padding(V.float(), 8, seed=0)  # fills the whole space, in float32
    assert full.dtype == torch.float32
    Q = torch.cat([V.float(), full], dim=1)
    torch.testing.assert_close(Q.T @ Q, torch.eye(12), atol=1e-5, rtol=0)
    empty = orthonormal_padding(torch.zeros(6, 0), 2, seed=0)
    torch.testing.assert_close(empty.T @ empty, torch.eye(2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="cannot pad"):
        orthonormal_padding(V, 9, seed=0)


def test_frobenius_of_product_and_relative_error(gen):
    B, A = _stack(gen, 30, 20, 5, torch.float64)
    assert float(frobenius_of_product(B, A)) == pytest.approx(float(torch.linalg.norm(B @ A)), rel=1e-12)
    x = torch.tensor([3.0, 4.0])
    assert relative_error(x, torch.zeros(2)) == pytest.approx(5.0 / math.ulp(1.0))
    assert relative_error(x * 1.1, x) == pytest.approx(0.1)


def test_stable_seed():
    # zlib.crc32 is stable across processes (unlike hash()); different parts give different seeds
    assert stable_seed(0, "m", 8) == stable_seed(0, "m", 8)
    assert stable_seed(0, "m", 8) != stable_seed(0, "m", 9)
    assert stable_seed(0, "m", 8) != stable_seed(1, "m", 8)
    assert 0 <= stable_seed("x") < 2**31
    import zlib

    assert stable_seed(0, "m", 8) == zlib.crc32(b"0\x1fm\x1f8") & 0x7FFFFFFF  # golden: the documented join
