"""Shared helpers of the core tests: random client updates and naive float64 references.

The helpers are plain functions exposed through the session-scoped ``helpers`` fixture (a
``SimpleNamespace``), because test modules in different folders cannot import a ``conftest``
module reliably. Session scope keeps the fixture usable inside hypothesis tests.

Every reference here is written independently of :mod:`flexlora.core`: it forms dense
``out x in`` matrices in float64 and uses a full ``torch.linalg.svd``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import pytest
import torch

from flexlora.core import ClientUpdate


def make_update(
    gen: torch.Generator,
    shapes: Mapping[str, tuple[int, int]],
    ranks: Mapping[str, int] | int,
    *,
    num_examples: int = 10,
    alpha: float = 16.0,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
    client_id: str | None = None,
    rslora: bool = False,
) -> ClientUpdate:
    """A client update with Gaussian factors ``A: r x in``, ``B: out x r`` for every module."""
    factors = {}
    for m, (out_f, in_f) in shapes.items():
        r = ranks[m] if isinstance(ranks, Mapping) else ranks
        A = torch.randn(r, in_f, generator=gen, dtype=torch.float64).to(dtype)
        B = (scale * torch.randn(out_f, r, generator=gen, dtype=torch.float64)).to(dtype)
        factors[m] = (A, B)
    return ClientUpdate(factors, num_examples=num_examples, alpha=alpha, client_id=client_id, rslora=rslora)


def weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """``p_k = n_k / sum_j n_j`` computed by hand."""
    total = float(sum(u.num_examples for u in updates))
    return [u.num_examples / total for u in updates]


def client_product(update: ClientUpdate, module: str) -> torch.Tensor:
    """``(alpha_k / r_k) B_k A_k`` in float64; ``(alpha_k / sqrt(r_k)) B_k A_k`` for an rsLoRA client."""
    A, B = update.factors[module]
    r = A.shape[0]
    denom = math.sqrt(r) if update.rslora else r
    return (float(update.alpha) / denom) * (B.double() @ A.double())


def reference_dense(updates: Sequence[ClientUpdate], module: str) -> torch.Tensor:
    """Naive ``sum_k p_k s_k B_k A_k`` in float64, ``s_k`` each client's own scaling."""
    p = weights(updates)
    return sum(pk * client_product(u, module) for pk, u in zip(p, updates))


def best_rank(M: torch.Tensor, r: int) -> torch.Tensor:
    """Best rank-``r`` approximation of ``M`` (float64, full SVD, Eckart-Young)."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def tail_error(M: torch.Tensor, r: int) -> float:
    """``sqrt(sum_{i > r} sigma_i^2)``: the Eckart-Young optimum of the rank-``r`` error."""
    S = torch.linalg.svdvals(M.double())
    return float(torch.sqrt((S[r:] ** 2).sum()))


def relative_gap(M: torch.Tensor, r: int) -> float:
    """``(sigma_r - sigma_{r+1}) / sigma_1``: how well-conditioned the rank-``r`` truncation is
    (Wedin: a perturbation ``E`` moves the truncation by about ``||E|| sigma_1 / gap``)."""
    S = torch.linalg.svdvals(M.double())
    if r >= S.shape[0] or float(S[0]) == 0.0:
        return 1.0
    return float((S[r - 1] - S[r]) / S[0])


def effective(
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], alpha: float | Mapping[str, float], *, rslora: bool = False
):
    """``{module: (alpha / r) B A}`` in float64 for distributed factors (``alpha / sqrt(r)`` with ``rslora``)."""
    out = {}
    for m, (A, B) in factors.items():
        a = alpha[m] if isinstance(alpha, Mapping) else alpha
        r = A.shape[0]
        out[m] = (float(a) / (math.sqrt(r) if rslora else r)) * (B.double() @ A.double())
    return out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref||_F / ||ref||_F`` in float64 (absolute error when ``ref`` is zero)."""
    x, ref = x.double().cpu(), ref.double().cpu()
    den = float(torch.linalg.norm(ref))
    num = float(torch.linalg.norm(x - ref))
    return num / den if den > 0 else num


def draw_round(
    data, *, max_dim: int = 40, max_clients: int = 5, max_modules: int = 3, dtype=torch.float32,
    rslora: bool | None = False,
):
    """Draw a random round with hypothesis: shapes per module, ranks per client AND per module,
    alphas, num_examples, and factor magnitudes differing across clients.

    ``rslora`` sets every client's scaling rule; None draws it per client (a mixed round). The
    default draws nothing extra, so existing tests see the same examples.

    Returns ``(updates, shapes)``.
    """
    from hypothesis import strategies as st

    n_modules = data.draw(st.integers(1, max_modules), label="n_modules")
    shapes = {}
    for j in range(n_modules):
        out_f = data.draw(st.integers(1, max_dim), label=f"out{j}")
        in_f = data.draw(st.integers(1, max_dim), label=f"in{j}")
        shapes[f"layers.{j}.proj"] = (out_f, in_f)
    n_clients = data.draw(st.integers(1, max_clients), label="n_clients")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    updates = []
    for k in range(n_clients):
        ranks = {m: data.draw(st.integers(1, min(s)), label=f"rank{k}{m}") for m, s in shapes.items()}
        alpha = data.draw(st.sampled_from([1.0, 8.0, 16.0, 32.0, 3.5]), label=f"alpha{k}")
        n = data.draw(st.integers(1, 5000), label=f"n{k}")
        scale = data.draw(st.sampled_from([1e-2, 1.0, 30.0]), label=f"scale{k}")
        rs = data.draw(st.booleans(), label=f"rslora{k}") if rslora is None else rslora
        updates.append(make_update(gen, shapes, ranks, num_examples=n, alpha=alpha, dtype=dtype, scale=scale,
                                   rslora=rs))
    return updates, shapes


_HELPERS = SimpleNamespace(
    make_update=make_update,
    weights=weights,
    client_product=client_product,
    reference_dense=reference_dense,
    best_rank=best_rank,
    tail_error=tail_error,
    relative_gap=relative_gap,
    effective=effective,
    rel_err=rel_err,
    draw_round=draw_round,
)


@pytest.fixture(scope="session")
def helpers() -> SimpleNamespace:
    return _HELPERS


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
