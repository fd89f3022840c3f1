"""The float64 Gram path of ``svd_of_product`` (method="gram") on the rounds real federations
produce: clients that start from one distributed global update and move a little, so the stacked
factors are nearly collinear and the Gram matrices numerically singular."""

from __future__ import annotations

import pytest
import torch

from flexlora.core.lowrank import relative_error, svd_of_product

RANKS = (8, 30, 200, 8, 30, 200, 8)


def _best(ref: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(ref, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def _round(gen, out_f, in_f, noise):
    """Clients of RANKS that received the top r directions of one global update of rank 200 and
    moved by ``noise`` (relative); weights folded into B as the aggregators do."""
    gb = torch.randn(out_f, 200, generator=gen, dtype=torch.float64)
    ga = torch.randn(200, in_f, generator=gen, dtype=torch.float64) / in_f**0.5
    Bs, As = [], []
    for k, r in enumerate(RANKS):
        w = (k + 1) / sum(range(1, len(RANKS) + 1))
        Bs.append(w * (gb[:, :r] + noise * torch.randn(out_f, r, generator=gen, dtype=torch.float64)))
        As.append(ga[:r] + noise * torch.randn(r, in_f, generator=gen, dtype=torch.float64) / in_f**0.5)
    return torch.cat(Bs, 1).float(), torch.cat(As, 0).float()


def _check(res, B, A, k, tol):
    ref = B.double() @ A.double()
    eye = torch.eye(k, dtype=torch.float64)
    assert float((res.U.double().T @ res.U.double() - eye).abs().max()) <= tol
    assert float((res.V.double().T @ res.V.double() - eye).abs().max()) <= tol
    S_ref = torch.linalg.svdvals(ref)[:k]
    assert float((res.S.double() - S_ref).abs().max()) <= tol * float(S_ref[0])
    # Eckart-Young: as good as the best rank-k approximation, to 1e-5 of ||B A||
    best = _best(ref, k)
    assert relative_error(res.dense(), best) <= tol


@pytest.mark.parametrize("noise", [0.0, 1e-6, 1e-3, 1e-1])
def test_gram_path_holds_1e5_on_nearly_collinear_rounds(gen, noise):
    B, A = _round(gen, 600, 500, noise)
    res = svd_of_product(B, A, method="gram", max_rank=200)
    assert res.method == "gram"  # no fallback: the eigen square roots absorb the singular Grams
    _check(res, B, A, 200, 1e-5)


def test_gram_path_is_more_accurate_than_householder_float32(gen):
    B, A = _round(gen, 600, 500, 1e-3)
    best = _best(B.double() @ A.double(), 200)
    gram = relative_error(svd_of_product(B, A, method="gram", max_rank=200).dense(), best)
    qr = relative_error(svd_of_product(B, A, method="qr", max_rank=200).dense(), best)
    assert gram < qr


def test_numerically_zero_directions_get_an_orthonormal_completion(gen):
    # Every client returns exactly its slice of the same global update: B A has rank 200 while
    # the full result keeps min(R, out, in) = 484 triplets, 284 of them zero.
    B, A = _round(gen, 600, 500, 0.0)
    res = svd_of_product(B, A, method="gram")
    assert res.method == "gram" and res.S.shape == (484,)
    assert float(res.S[200:].abs().max()) == 0.0
    _check(res, B, A, 484, 1e-5)
    assert relative_error(res.dense(), B.double() @ A.double()) <= 1e-5


def test_all_zero_update_falls_back_to_householder():
    B, A = torch.zeros(30, 4), torch.zeros(4, 20)
    res = svd_of_product(B, A, method="gram")
    assert res.method == "qr" and float(res.S.abs().max()) == 0.0


def test_float64_inputs_stay_float64(gen):
    B, A = _round(gen, 120, 100, 1e-2)
    B, A = B[:, :60].double(), A[:60].double()
    res = svd_of_product(B, A, method="gram")
    assert res.U.dtype == torch.float64 and res.method == "gram"
    _check(res, B, A, 60, 1e-10)
