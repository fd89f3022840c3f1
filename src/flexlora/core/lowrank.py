"""Truncated SVD of a sum of low-rank products, without forming the dense matrix when it can.

FlexLoRA needs the SVD of ``dW = sum_k c_k B_k A_k`` where every ``B_k A_k`` has a small rank.
Written as one product ``dW = Bc @ Ac`` with ``Bc = [c_1 B_1, ..., c_K B_K]`` (``out x R``) and
``Ac = [A_1; ...; A_K]`` (``R x in``), ``R = sum_k r_k``, its exact thin SVD follows from two thin
QR factorisations and one ``R x R`` SVD:

    Bc = Qb Rb,  Ac^T = Qa Ra,  Rb Ra^T = Um S Vm^T   =>   dW = (Qb Um) S (Qa Vm)^T.

This costs ``O((out + in) R^2 + R^3)`` instead of ``O(out * in * min(out, in))`` for a dense SVD.
When ``R`` approaches ``min(out, in)`` the dense path (one GEMM, one SVD) is cheaper and is used.

Two opt-in exact paths do the same from the float64 Gram matrices, by matrix products and small
decompositions, and are about ten times more accurate than the float32 Householder path:
"cholesky" (:func:`_svd_cholesky`: one Cholesky and one R x R eigendecomposition; about as fast
as "qr" on CPU) and "gram" (:func:`_svd_gram`: eigen square roots of both Grams; slower, but it
needs no fallback on nearly collinear stacks). When their checks fail they fall back to
Householder QR. Neither is the default: on these CPUs LAPACK's Householder QR of a 4096 x 722
matrix runs as fast as a float64 Gram of it, so no Gram path was measured faster by a margin
(docs/BENCHMARKS.md).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

import torch

from flexlora.core.types import lora_scaling_denominator

SVDMethod = Literal["auto", "cholesky", "gram", "qr", "dense", "randomized"]


@dataclass
class LowRankSVD:
    """Thin SVD ``U diag(S) V^T`` of a module's global update.

    Attributes
    ----------
    U : Tensor, shape (out, k)
    S : Tensor, shape (k,), non-increasing, non-negative
    V : Tensor, shape (in, k)
    method : str
        The path that produced it ("qr", "dense" or "randomized").
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    method: str = "qr"

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.U.shape[0]), int(self.V.shape[0]))

    def dense(self) -> torch.Tensor:
        """The dense ``out x in`` matrix ``U diag(S) V^T``."""
        return (self.U * self.S) @ self.V.T


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Float dtype for decompositions: at least float32 (half precision QR/SVD is unsupported or poor)."""
    if dtype in (torch.float64,):
        return dtype
    return torch.float32


FLOAT64_CORE_MAX = 384
"""Largest ``R`` whose ``R x R`` core is formed and decomposed in float64 by default.

Below it the float64 core costs little next to the two QR factorisations and removes most of
the rounding of the pipeline; above it, it would dominate the run time (measured on 2 CPU cores:
722 x 722 SVD 0.07 s in float32, 0.11 s in float64), and float32 is kept.
"""


def _core_dtype(B: torch.Tensor, R: int) -> torch.dtype:
    if B.dtype == torch.float64:
        return torch.float64
    if B.device.type == "mps" or R > FLOAT64_CORE_MAX:  # MPS has no float64
        return B.dtype
    return torch.float64


def _auto_method(out_f: int, R: int, in_f: int, dense_threshold: float) -> SVDMethod:
    """What "auto" picks for an ``out x R`` by ``R x in`` product: thin QR until ``R`` nears ``min(out, in)``."""
    return "dense" if R > dense_threshold * min(out_f, in_f) else "qr"


def svd_of_product(
    B: torch.Tensor,
    A: torch.Tensor,
    *,
    method: SVDMethod = "auto",
    dense_threshold: float = 0.85,
    max_rank: int | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> LowRankSVD:
    """Exact (or, on request, randomized) thin SVD of ``B @ A``.

    Parameters
    ----------
    B : Tensor, shape (out, R)
    A : Tensor, shape (R, in)
    method : {"auto", "cholesky", "gram", "qr", "dense", "randomized"}, default "auto"
        "auto" picks "qr" when ``R <= dense_threshold * min(out, in)`` and "dense" otherwise.
        "cholesky", "gram", "qr" and "dense" are exact; "cholesky" and "gram" fall back to "qr"
        (Householder) when their checks fail, and the result's ``method`` says which one produced
        it. "cholesky" (:func:`_svd_cholesky`) is accurate to about 3e-7 of ``||B A||`` where it
        runs, about as fast as "qr" on CPU, and gives way on nearly collinear stacks (condition
        above ``CHOLESKY_MAX_COND``). "gram" is accurate
        to about 1e-7 of ``||B A||`` also for float64 inputs (singular values below 1e-7 of the
        largest count as zero). "randomized" is approximate (see
        ``randomized_svd_of_product``) and is only used when asked for; it needs ``max_rank``.
    dense_threshold : float, default 0.85
        Crossover of "auto" between the thin-QR and dense paths, as a fraction of ``min(out, in)``.
    max_rank : int or None, default None
        Keep only the top ``max_rank`` triplets (memory); None keeps all ``min(R, out, in)``.
    oversample, power_iters, generator
        Randomized SVD settings (ignored otherwise).

    Returns
    -------
    LowRankSVD
        With ``k = min(R, out, in)`` (or ``max_rank``) triplets, on ``B``'s device, in float32
        (float64 when the inputs are float64).
    """
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"svd_of_product needs B (out x R) and A (R x in), got {tuple(B.shape)} and {tuple(A.shape)}")
    out_f, R = B.shape
    in_f = A.shape[1]
    full = min(out_f, in_f, R)
    keep = full if max_rank is None else min(max_rank, full)
    dtype = compute_dtype(B.dtype, B.device)
    B = B.to(dtype)
    A = A.to(dtype)
    if method == "auto":
        method = _auto_method(out_f, R, in_f, dense_threshold)
    if method in ("cholesky", "gram", "qr") and R > min(out_f, in_f):
        raise ValueError(f"method={method!r} needs R <= min(out, in), got R={R} for {out_f} x {in_f}; use 'dense'")
    if method in ("cholesky", "gram"):
        fast = _svd_cholesky if method == "cholesky" else _svd_gram
        res = fast(B, A, keep) if B.device.type != "mps" else None  # MPS has no float64
        if res is None:
            res = _svd_qr(B, A, keep)
    elif method == "qr":
        res = _svd_qr(B, A, keep)
    elif method == "dense":
        res = _svd_dense(B, A)
    elif method == "randomized":
        if max_rank is None:
            raise ValueError("method='randomized' needs max_rank (the largest rank that will be distributed)")
        res = randomized_svd_of_product(B, A, max_rank, oversample=oversample, power_iters=power_iters, generator=generator)
    else:
        raise ValueError(f"unknown SVD method {method!r}; use 'auto', 'cholesky', 'gram', 'qr', 'dense' or 'randomized'")
    if res.S.shape[0] > keep:
        res = LowRankSVD(res.U[:, :keep].contiguous(), res.S[:keep].contiguous(), res.V[:, :keep].contiguous(), res.method)
    return res


def _apply_q(h: torch.Tensor, tau: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Q_thin @ x`` for the Householder QR ``(h, tau)`` of an ``m x n`` matrix and ``x: n x k``
    (or a batch of them: ``(..., m, n)`` and ``(..., n, k)``).

    Applying the reflectors to the ``k`` wanted columns costs ``O(m n k)``; forming ``Q``
    explicitly would cost ``O(m n^2)`` and is the dominant term when only a few ranks are kept.
    """
    m, n = h.shape[-2:]
    padded = torch.zeros(*h.shape[:-2], m, x.shape[-1], dtype=h.dtype, device=h.device)
    padded[..., :n, :] = x
    return torch.ormqr(h, tau, padded)


def _qr_triplets(B: torch.Tensor, A: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V)`` of the thin-QR path for ``B @ A``, or for a batch ``(..., out, R) @ (..., R, in)``."""
    # Requires R <= min(out, in), which the "auto" crossover guarantees.
    R = B.shape[-1]
    # LAPACK works on column-major matrices: A.T of a row-major Ac is already column-major, and
    # the aggregators' stacks (LowRankSum.stack, scaled_stack) build Bc column-major, so neither
    # factorisation copies its input first (a stacked batch of B is row-major per matrix and is
    # copied once).
    hb, tau_b = torch.geqrf(B)  # Bc = Qb Rb
    ha, tau_a = torch.geqrf(A.mT)  # Ac^T = Qa Ra
    rb = torch.triu(hb[..., :R, :])
    ra = torch.triu(ha[..., :R, :])
    small = _core_dtype(B, R)
    core = rb.to(small) @ ra.to(small).mT
    um, s, vmh = torch.linalg.svd(core, full_matrices=False)
    dtype = B.dtype
    U = _apply_q(hb, tau_b, um[..., :keep].to(dtype))
    V = _apply_q(ha, tau_a, vmh[..., :keep, :].mT.to(dtype))
    return U, s[..., :keep].to(dtype), V


def _svd_qr(B: torch.Tensor, A: torch.Tensor, keep: int) -> LowRankSVD:
    U, S, V = _qr_triplets(B, A, keep)
    return LowRankSVD(U, S, V, "qr")


BATCH_MAX_BYTES = 256 * 2**20
"""Largest input of one batched call; a bigger group is split, so batching never holds more
than this in extra copies."""


def batches_well(
    B: torch.Tensor, A: torch.Tensor, *, method: SVDMethod = "auto", dense_threshold: float = 0.85,
    batch: bool | None = None,
) -> bool:
    """Whether :func:`svd_of_products` batches ``B @ A`` with the other products of its shape.

    Only the thin-QR path is batched (as "auto" or "qr" picks it for this ``R``), on CPU or CUDA.
    ``batch=None`` batches on CUDA, where one call per small module leaves the device idle;
    True batches on CPU too, False never. On CPU it pays only for narrow stacks and costs above
    them (benchmarks/batched_modules.py; docs/BENCHMARKS.md), so None leaves CPU rounds unbatched.
    """
    if batch is False or B.device.type not in ("cpu", "cuda"):
        return False
    out_f, R = B.shape
    if method == "auto":
        method = _auto_method(out_f, R, A.shape[1], dense_threshold)
    if method != "qr" or R > min(out_f, A.shape[1]):
        return False
    return bool(batch) or B.device.type == "cuda"


def svd_of_products(
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    batch: bool | None = None,
    method: SVDMethod = "auto",
    dense_threshold: float = 0.85,
    max_rank: int | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> list[LowRankSVD]:
    """:func:`svd_of_product` of every ``(B, A)`` in ``pairs``, in order, batching products of one shape.

    Products that :func:`batches_well` (same ``out``, ``R``, ``in``, dtype and device) go through
    one batched thin-QR call per group (at most ``BATCH_MAX_BYTES`` of input per call); the rest,
    and groups of one, through :func:`svd_of_product`. A batched result equals the per-product
    one to float32 rounding, not bit for bit (BLAS kernels differ with the alignment of a matrix
    inside the batch); the same pairs in the same order always give the same bits.

    Parameters
    ----------
    pairs : list of (Tensor, Tensor)
        ``(B, A)`` with ``B: out x R`` and ``A: R x in``.
    batch : bool or None, default None
        See :func:`batches_well`.
    method, dense_threshold, max_rank, oversample, power_iters, generator
        As in :func:`svd_of_product`.

    Returns
    -------
    list of LowRankSVD
        One per pair, each with its own storage (no view into a batch, so saving one saves only it).
    """
    single = dict(method=method, dense_threshold=dense_threshold, max_rank=max_rank, oversample=oversample,
                  power_iters=power_iters, generator=generator)
    results: list[LowRankSVD | None] = [None] * len(pairs)
    groups: dict[tuple, list[int]] = {}
    for i, (B, A) in enumerate(pairs):
        if B.ndim == 2 and A.ndim == 2 and B.shape[1] == A.shape[0] and batches_well(
                B, A, method=method, dense_threshold=dense_threshold, batch=batch):
            key = (B.shape[0], B.shape[1], A.shape[1], compute_dtype(B.dtype, B.device), B.device)
            groups.setdefault(key, []).append(i)
        else:
            results[i] = svd_of_product(B, A, **single)
    for (out_f, R, in_f, dtype, _), idx in groups.items():
        if len(idx) == 1:
            results[idx[0]] = svd_of_product(*pairs[idx[0]], **single)
            continue
        full = min(out_f, in_f, R)
        keep = full if max_rank is None else min(max_rank, full)
        per_pair = (out_f + in_f) * R * torch.empty((), dtype=dtype).element_size()
        step = max(1, BATCH_MAX_BYTES // per_pair)
        for start in range(0, len(idx), step):
            part = idx[start : start + step]
            U, S, V = _qr_triplets(torch.stack([pairs[i][0].to(dtype) for i in part]),
                                   torch.stack([pairs[i][1].to(dtype) for i in part]), keep)
            for j, i in enumerate(part):
                results[i] = LowRankSVD(U[j].clone(), S[j].clone(), V[j].clone(), "qr")
    return results  # type: ignore[return-value]


GRAM_ZERO = 1e-7
"""Singular values below ``GRAM_ZERO * s_1`` count as zero on the Gram path: their directions are
replaced by an orthonormal completion. Dropping them changes ``U S V^T`` by at most
``sqrt(k) * GRAM_ZERO * s_1`` in Frobenius norm (1.4e-6 relative for k = 200)."""

GRAM_ORTHO_TOL = 1e-6
"""Largest ``|U^T U - I|`` entry (float64) the Gram path accepts after its orthonormalisation
pass; beyond it (a badly conditioned set of kept directions) it gives way to Householder QR."""


def _sqrt_factor(G: torch.Tensor) -> torch.Tensor:
    """``L`` with ``L L^T = G`` for a symmetric PSD ``G`` (float64), from its eigendecomposition.

    Unlike Cholesky it never fails on the (numerically) singular Grams of real rounds, where
    clients start from the same factors and their stacked columns are nearly collinear.
    """
    w, Q = torch.linalg.eigh(G)
    return Q * w.clamp(min=0).sqrt()


def _orthonormalise(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cholesky QR of a float64 ``X`` whose columns are nearly orthonormal: ``X = Q R``; None
    when ``X^T X`` is not safely positive definite."""
    G = X.T @ X
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    if float((G - eye).abs().max()) > 0.5:
        return None
    L, info = torch.linalg.cholesky_ex(G)
    if int(info) != 0:
        return None
    Q = torch.linalg.solve_triangular(L, X.T, upper=False).T  # X L^{-T}
    return Q, L.T


def _complete_zero_directions(
    U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad the ``nz`` nonzero triplets of a Gram path to ``k`` with zero singular values: any
    orthonormal completion of ``U`` and ``V`` is an SVD (seeded, so results are reproducible)."""
    nz = U.shape[1]
    if nz >= k:
        return U, S, V
    seed = stable_seed("gram-completion", U.shape[0], V.shape[0], k)
    U = torch.cat([U, orthonormal_padding(U, k - nz, seed)], dim=1)
    V = torch.cat([V, orthonormal_padding(V, k - nz, seed + 1)], dim=1)
    return U, torch.cat([S, S.new_zeros(k - nz)]), V


def _svd_gram(B: torch.Tensor, A: torch.Tensor, keep: int) -> LowRankSVD | None:
    """Exact thin SVD of ``B @ A`` from the two ``R x R`` Gram matrices: matrix products on the
    large factors, decompositions only of ``R x R`` and ``k x k`` matrices.

    With ``Gb = B^T B = Lb Lb^T`` and ``Ga = A A^T = La La^T`` (formed in float64, where the
    products of float32 entries are exact), ``B = Qb Lb^T`` and ``A^T = Qa La^T`` for orthonormal
    ``Qb``, ``Qa``, so ``B A = Qb (Lb^T La) Qa^T`` and the small core ``C = Lb^T La = Um S Vm^T``
    holds the singular values. The singular vectors follow without inverting the Grams:
    ``U = B A V S^-1 = B (La Vm) S^-1`` and ``V = A^T (Lb Um) S^-1``. One Cholesky-QR pass on
    the thin ``U`` and ``V`` (and an SVD of their ``k x k`` core) restores orthonormality to
    float64 accuracy. The Gram squares the condition number, which float64 absorbs: the
    singular values are accurate to about ``1e-8 ||B|| ||A||`` (sqrt of float64's epsilon).

    Returns None when a check fails (the caller falls back to Householder QR).
    """
    out_dtype = B.dtype
    Bd, Ad = B.double(), A.double()
    Lb = _sqrt_factor(Bd.T @ Bd)
    La = _sqrt_factor(Ad @ Ad.T)
    um, s, vmh = torch.linalg.svd(Lb.T @ La, full_matrices=False)
    if not bool(torch.isfinite(s).all()):
        return None
    s1 = float(s[0]) if s.numel() else 0.0
    k = min(keep, s.shape[0])
    nz = int((s[:k] > GRAM_ZERO * s1).sum()) if s1 > 0 else 0
    if nz == 0:
        return None  # an all-zero update: Householder gives its (arbitrary) orthonormal bases
    inv = 1.0 / s[:nz]
    U = Bd @ ((La @ vmh[:nz].T) * inv)
    V = Ad.T @ ((Lb @ um[:, :nz]) * inv)
    qu = _orthonormalise(U)
    qv = _orthonormalise(V)
    if qu is None or qv is None:
        return None
    (U, ru), (V, rv) = qu, qv
    # U S V^T = Qu (Ru S Rv^T) Qv^T: re-diagonalise the k x k core.
    p, s2, qh = torch.linalg.svd((ru * s[:nz]) @ rv.T)
    U, V, S = U @ p, V @ qh.T, s2
    eye = torch.eye(nz, dtype=U.dtype, device=U.device)
    if max(float((U.T @ U - eye).abs().max()), float((V.T @ V - eye).abs().max())) > GRAM_ORTHO_TOL:
        return None
    U, S, V = _complete_zero_directions(U, S, V, k)
    return LowRankSVD(U.to(out_dtype), S.to(out_dtype), V.to(out_dtype), "gram")


CHOLESKY_MAX_COND = 1e3
"""Largest condition estimate of the stacked ``B`` (ratio of the extreme diagonal entries of the
Cholesky factor of its column-equilibrated Gram) the Cholesky path accepts. Its float32 back
projection ``U = B (L^-T W)`` loses about ``u * cond`` (``u = 6e-8``) of orthonormality and
accuracy, so beyond 1e3 such rounds (clients that barely moved from the same distributed
factors) go to Householder QR."""

CHOLESKY_ORTHO_TOL = 0.1
"""Largest ``|U^T U - I|`` entry (before the Cholesky-QR pass) the Cholesky path accepts; one
pass maps an orthogonality error ``d`` to about ``u * (1 + d)``, so below 0.1 the result is
orthonormal to float32 accuracy."""


def gram_matrix(X: torch.Tensor, *, blocks: int | None = None) -> torch.Tensor:
    """``X^T X`` from the upper blocks only, mirrored: symmetric, about 2/3 of a plain GEMM's work.

    torch has no SYRK; computing the block rows ``X[:, a:b]^T X[:, a:]`` of the upper triangle and
    mirroring them skips the lower blocks. Three blocks measured fastest on 2 CPU cores
    (4096 x 722 float32: 0.046 s against 0.090 s for ``X.T @ X``; float64 about twice both).
    """
    R = X.shape[1]
    nb = blocks if blocks is not None else max(1, min(3, R // 128))
    if nb <= 1:
        return X.T @ X
    G = torch.empty(R, R, dtype=X.dtype, device=X.device)
    edges = [round(i * R / nb) for i in range(nb + 1)]
    for a, b in zip(edges[:-1], edges[1:]):
        row = X[:, a:b].T @ X[:, a:]
        G[a:b, a:] = row
        G[a:, a:b] = row.T
    return G


def _cholesky_factor(G: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor of a float64 Gram, or None when it fails or is too ill-conditioned.

    The condition is judged after scaling the columns to unit norm (``G = D Gs D``): the client
    weights and alpha/r factors scale whole columns by up to a few hundred, which costs the
    Cholesky QR no accuracy (van der Sluis) but would fail an unscaled test.
    """
    d = G.diagonal().sqrt()
    if not bool(torch.isfinite(d).all()) or float(d.min()) <= 0.0:
        return None  # a zero column: the stack is rank-deficient
    Ls, info = torch.linalg.cholesky_ex(G / d[:, None] / d[None, :])
    if int(info) != 0:
        return None
    ds = Ls.diagonal()
    if not bool(torch.isfinite(ds).all()) or float(ds.min()) * CHOLESKY_MAX_COND < float(ds.max()):
        return None
    return d[:, None] * Ls


def _svd_cholesky(B: torch.Tensor, A: torch.Tensor, keep: int) -> LowRankSVD | None:
    """Exact thin SVD of ``B @ A`` by matrix products: float64 Grams, Cholesky, one R x R eigh.

    With ``Gb = B^T B = L L^T`` (Cholesky), ``Qb = B L^-T`` is orthonormal and
    ``B A = Qb M`` with ``M = L^T A`` (``R x in``). The left singular vectors of ``M`` are the
    eigenvectors ``W`` of ``K = M M^T = L^T (A A^T) L`` (``R x R``, float64), with eigenvalues
    ``s^2``; so ``U = B (L^-T W)`` and ``V = A^T (L W) / s``. Both are large-by-small products
    (GEMM). One Cholesky-QR pass on the thin float32 ``U`` and ``V`` and an SVD of their
    ``k x k`` core restore the orthonormality lost in the back projections.

    The Grams are formed in float64 (blocked, :func:`gram_matrix`). Formed in float32 the path
    was 1.25-1.44x faster than Householder QR at 4096-wide modules, but on a real SmolLM2 round
    (clients that started from the same distributed factors, so the stacked ``A`` is nearly
    collinear) it missed the best rank-16 approximation by up to 4.7e-5: the float32 rounding
    of ``A A^T`` enters ``K``, whose eigenvalues are the squared singular values.

    The Gram of ``B`` is first formed from its top ``1.25 R`` rows: adding rows never lowers its
    smallest eigenvalue, so if that part is already too ill-conditioned the path gives up having
    spent a fraction of one Gram, and ``svd_of_product`` falls back to Householder QR.

    Returns None when a check fails.
    """
    out_f, R = B.shape
    work = torch.float64
    head = min(out_f, R + R // 4 + 8)
    Gb = gram_matrix(B[:head].to(work))
    L = _cholesky_factor(Gb)
    if L is None:
        return None
    if head < out_f:
        Gb += gram_matrix(B[head:].to(work))
        L = _cholesky_factor(Gb)
        if L is None:
            return None
    K = L.T @ gram_matrix(A.T.to(work)) @ L
    w, W = torch.linalg.eigh(K)
    w, W = w.flip(0), W.flip(1)  # descending
    if not bool(torch.isfinite(w).all()) or float(w[0]) <= 0:
        return None  # an all-zero update: Householder gives its (arbitrary) orthonormal bases
    k = min(keep, R)
    s = w[:k].clamp(min=0).sqrt()
    nz = int((s > GRAM_ZERO * s[0]).sum())
    s, W = s[:nz], W[:, :nz]
    U = B @ torch.linalg.solve_triangular(L.T, W, upper=True).to(B.dtype)
    V = A.T @ ((L @ W) / s).to(A.dtype)
    Gu, Gv = (U.T @ U).to(work), (V.T @ V).to(work)
    eye = torch.eye(nz, dtype=work, device=B.device)
    if max(float((Gu - eye).abs().max()), float((Gv - eye).abs().max())) > CHOLESKY_ORTHO_TOL:
        return None
    Lu, info_u = torch.linalg.cholesky_ex(Gu)
    Lv, info_v = torch.linalg.cholesky_ex(Gv)
    if int(info_u) != 0 or int(info_v) != 0:
        return None
    # U S V^T = (U Lu^-T) (Lu^T S Lv) (V Lv^-T)^T: re-diagonalise the k x k core.
    p, S, qh = torch.linalg.svd((Lu.T * s) @ Lv)
    U = U @ torch.linalg.solve_triangular(Lu.T, p, upper=True).to(B.dtype)
    V = V @ torch.linalg.solve_triangular(Lv.T, qh.T, upper=True).to(A.dtype)
    U, S, V = _complete_zero_directions(U, S, V, k)
    return LowRankSVD(U, S.to(B.dtype), V, "cholesky")


def svd_of_dense(M: torch.Tensor, *, max_rank: int | None = None) -> LowRankSVD:
    """Thin SVD of a dense ``out x in`` matrix (float32 at least), keeping ``max_rank`` triplets
    (None: all ``min(out, in)``)."""
    M = M.to(compute_dtype(M.dtype, M.device))
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    keep = S.shape[0] if max_rank is None else min(max_rank, S.shape[0])
    return LowRankSVD(U[:, :keep].contiguous(), S[:keep].contiguous(), Vh[:keep].T.contiguous(), "dense")


def _svd_dense(B: torch.Tensor, A: torch.Tensor) -> LowRankSVD:
    dense = B @ A
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    return LowRankSVD(U, S, Vh.T, "dense")


def randomized_svd_of_product(
    B: torch.Tensor,
    A: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> LowRankSVD:
    """Approximate top-``rank`` SVD of the implicit operator ``B @ A`` (Halko, Martinsson, Tropp 2011).

    The operator is applied as ``B @ (A @ X)``, so the dense matrix is never formed.

    Error bound (Halko et al., 2011, Cor. 10.10): with ``p = oversample >= 2``, ``q = power_iters``
    and ``k = rank``, the expected spectral error of the range approximation satisfies

        E ||M - Q Q^T M|| <= [1 + 4 sqrt((k + p) / (p - 1)) * sqrt(min(out, in))]^(1 / (2q + 1)) * sigma_{k+1},

    so the result is near-optimal only when the spectrum decays past ``rank``. With a flat
    spectrum the error can approach ``sigma_{k+1}`` times that factor. Use the exact methods
    unless speed matters more than exactness.

    Parameters
    ----------
    B : Tensor, shape (out, R)
    A : Tensor, shape (R, in)
    rank : int
        Number of singular triplets wanted.
    oversample : int, default 10
    power_iters : int, default 2
    generator : torch.Generator or None
        Source of the Gaussian test matrix (explicit, for reproducibility).
    """
    out_f, in_f = B.shape[0], A.shape[1]
    return _randomized(lambda x: B @ (A @ x), lambda y: A.T @ (B.T @ y), lambda q: (q.T @ B) @ A, out_f, in_f,
                       rank, B.dtype, B.device, oversample, power_iters, generator)


def randomized_svd_of_dense(
    M: torch.Tensor, rank: int, *, oversample: int = 10, power_iters: int = 2,
    generator: torch.Generator | None = None,
) -> LowRankSVD:
    """Approximate top-``rank`` SVD of a dense ``out x in`` matrix (the method and error bound of
    :func:`randomized_svd_of_product`); ``O(out * in * (rank + oversample))`` against the
    ``O(out * in * min(out, in))`` of :func:`svd_of_dense`."""
    M = M.to(compute_dtype(M.dtype, M.device))
    return _randomized(lambda x: M @ x, lambda y: M.T @ y, lambda q: q.T @ M, M.shape[0], M.shape[1], rank,
                       M.dtype, M.device, oversample, power_iters, generator)


def _randomized(apply, apply_t, project, out_f: int, in_f: int, rank: int, dtype: torch.dtype,
                device: torch.device, oversample: int, power_iters: int,
                generator: torch.Generator | None) -> LowRankSVD:
    # apply: x -> M x; apply_t: y -> M^T y; project: q -> q^T M (the ell x in sketch).
    ell = min(rank + oversample, out_f, in_f)
    omega = torch.randn(in_f, ell, dtype=dtype, device=device, generator=generator)
    q, _ = torch.linalg.qr(apply(omega))
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(apply_t(q))
        q, _ = torch.linalg.qr(apply(z))
    small = project(q)  # ell x in
    ub, s, vh = torch.linalg.svd(small, full_matrices=False)
    U = q @ ub
    k = min(rank, s.shape[0])
    return LowRankSVD(U[:, :k].contiguous(), s[:k].contiguous(), vh[:k].T.contiguous(), "randomized")


def orthonormal_padding(V: torch.Tensor, extra: int, seed: int) -> torch.Tensor:
    """``extra`` unit columns orthogonal to the columns of ``V`` (``n x k``), seeded.

    Used when a client asks for more rank than the global update has: the extra ``A`` rows get
    these directions (and ``B`` zero columns), so the effective update is unchanged but the extra
    rank can still learn (an all-zero row of ``A`` with a zero column of ``B`` gets no gradient).
    """
    n, k = V.shape
    if k + extra > n:
        raise ValueError(f"cannot pad {k} columns by {extra} in dimension {n}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(n, extra, generator=g, dtype=torch.float64).to(device=V.device, dtype=V.dtype)
    if k > 0:
        x = x - V @ (V.T @ x)
        x = x - V @ (V.T @ x)  # second pass: classical Gram-Schmidt needs it for orthogonality
    q, _ = torch.linalg.qr(x)
    return q


def stable_seed(*parts: object) -> int:
    """A seed derived from ``parts`` that is stable across processes (unlike ``hash``)."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode()) & 0x7FFFFFFF


def truncate_to_factors(
    svd: LowRankSVD,
    rank: int,
    alpha: float,
    *,
    split: Literal["B", "A", "sqrt"] = "B",
    pad_seed: int = 0,
    rslora: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors ``(A, B)`` of rank ``rank`` whose effective update ``s B A`` is the best
    rank-``rank`` approximation ``U_r S_r V_r^T`` (Eckart-Young), with the receiving client's
    scaling ``s = alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA).

    Parameters
    ----------
    svd : LowRankSVD
    rank : int
    alpha : float
        The receiving client's LoRA alpha.
    split : {"B", "A", "sqrt"}, default "B"
        Where the singular values go: "B" is the paper's choice (``A = V_r^T``,
        ``B = U_r S_r / s``); "A" puts them in ``A``; "sqrt" shares them.
    pad_seed : int
        Seed of the orthonormal directions used when ``rank`` exceeds the rank held in ``svd``.
    rslora : bool, default False
        The receiving client applies rsLoRA scaling ``alpha / sqrt(rank)``.

    Returns
    -------
    tuple of Tensor
        ``(A, B)`` with ``A: rank x in`` and ``B: out x rank``.
    """
    k = svd.S.shape[0]
    r = min(rank, k)
    U, S, V = svd.U[:, :r], svd.S[:r], svd.V[:, :r]
    # 1 / s, formed as denominator / alpha (not 1 / lora_scaling) so that plain LoRA keeps the
    # exact float value rank / alpha it always had.
    scale = lora_scaling_denominator(rank, rslora) / float(alpha)
    if split == "B":
        A = V.T
        B = U * (S * scale)
    elif split == "A":
        A = (V * S).T
        B = U * scale
    elif split == "sqrt":
        root = S.sqrt()
        A = (V * root).T
        B = U * (root * scale)
    else:
        raise ValueError(f"unknown split {split!r}; use 'B', 'A' or 'sqrt'")
    return pad_to_rank(A, B, rank, svd.V[:, :r], pad_seed)


def pad_to_rank(
    A: torch.Tensor, B: torch.Tensor, rank: int, basis: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow factors ``(A: k x in, B: out x k)`` to ``rank`` without changing ``B @ A``.

    The new rows of ``A`` are seeded orthonormal directions orthogonal to the columns of
    ``basis`` (``in x j``), the new columns of ``B`` are zero (see :func:`orthonormal_padding`).
    Factors already at ``rank`` are returned as they are, made contiguous.
    """
    extra = rank - A.shape[0]
    if extra > 0:
        pad = orthonormal_padding(basis, extra, seed).T
        A = torch.cat([A, pad], dim=0)
        B = torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1)
    return A.contiguous(), B.contiguous()


def frobenius_of_product(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``||B @ A||_F`` from ``r x r`` Gram matrices, without forming ``B @ A``."""
    gb = B.T @ B
    ga = A @ A.T
    return torch.sqrt(torch.clamp((gb * ga).sum(), min=0.0))


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref||_F / max(||ref||_F, tiny)`` in float64."""
    x64, r64 = x.double(), ref.double()
    return float(torch.linalg.norm(x64 - r64) / max(float(torch.linalg.norm(r64)), math.ulp(1.0)))
