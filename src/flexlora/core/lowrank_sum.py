"""A running sum of low-rank products ``sum_k B_k A_k`` that stays exact and bounded in size: the
stack of factors while it is narrow, an exact compression (SVD) past a bound, a dense matrix
past ``min(out, in)`` (the streaming aggregation of :mod:`flexlora.core.aggregators`)."""

from __future__ import annotations

import torch

from flexlora.core.lowrank import svd_of_product


class LowRankSum:
    """Exact running sum ``sum_k B_k A_k`` of low-rank products of one ``out x in`` module, in
    memory that does not grow with the number of terms (streaming aggregation).

    The terms are kept as a stack of factors while it is narrow. When the stack grows wider than
    ``bound`` columns it is compressed exactly: by an exact thin SVD that keeps every nonzero
    direction (singular values above ``ZERO_TOL`` of the largest) while ``bound < min(out, in)``
    and the compressed stack is at most half the bound, and otherwise by switching to the dense
    ``out x in`` sum, to which later terms are added in place. So it holds at most
    ``(bound + r) (out + in)`` numbers, or ``out * in``, whatever the number of terms.

    Parameters
    ----------
    shape : (int, int)
        ``(out, in)`` of the module.
    bound : int or None, default None
        Stack width that triggers a compression; None is ``min(out, in)``, where the sum's rank
        saturates (the stack is then never compressed by SVD, it turns dense).
    dtype : torch.dtype, default float32
    device : torch.device or str, optional
    """

    ZERO_TOL = 1e-7
    """Singular values at most this fraction of the largest are dropped by a compression: below
    float32 rounding of the sum, so the compression is exact to float32 accuracy."""

    def __init__(self, shape: tuple[int, int], *, bound: int | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        out_f, in_f = int(shape[0]), int(shape[1])
        self.shape = (out_f, in_f)
        full = min(out_f, in_f)
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 1):
            raise ValueError(f"bound must be a positive int or None, got {bound!r}")
        self.bound = full if bound is None else min(bound, full)
        self.dtype = dtype
        self.device = device
        self._bs: list[torch.Tensor] = []
        self._as: list[torch.Tensor] = []
        self.width = 0
        self.dense_sum: torch.Tensor | None = None
        self.terms = 0
        self.compressions = 0

    def add(self, B: torch.Tensor, A: torch.Tensor, *, copy: bool = True) -> None:
        """Add the term ``B @ A`` (``B: out x r``, ``A: r x in``).

        The terms are held until the next compression. With ``copy`` (the default) they are
        copied first, so a caller may reuse its tensors once ``add`` returns; ``copy=False`` is for
        a caller whose tensors are its own fresh ones (it saves a transient copy of the term).
        """
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0] or (B.shape[0], A.shape[1]) != self.shape:
            raise ValueError(f"LowRankSum of shape {self.shape} cannot add B{tuple(B.shape)} @ A{tuple(A.shape)}")
        B = B.to(device=self.device or B.device, dtype=self.dtype, copy=copy)
        A = A.to(device=B.device, dtype=self.dtype, copy=copy)
        self.terms += 1
        if self.dense_sum is None:
            full = min(self.shape)
            r = int(A.shape[0])
            if self.bound < full and self._bs and self.width + r > self.bound:
                self._compress()  # what is held so far (at most `bound` wide) before the new term
        if self.dense_sum is not None:
            self.dense_sum.addmm_(B, A)
            return
        self._bs.append(B)
        self._as.append(A)
        self.width += int(A.shape[0])
        if self.width > self.bound:
            if self.bound < min(self.shape) and self.width <= min(self.shape):
                self._compress()
            else:
                self._to_dense()

    def _compress(self) -> None:
        # Exact thin SVD of the stack (width <= min(out, in)); keep its nonzero directions, or turn
        # dense when they are more than half the bound (compressing again soon would not pay).
        B, A = self.stack()
        self.compressions += 1
        svd = svd_of_product(B, A, method="qr")
        s1 = float(svd.S[0]) if svd.S.numel() else 0.0
        nz = int((svd.S > self.ZERO_TOL * s1).sum()) if s1 > 0 else 0
        self._bs, self._as = [svd.U[:, :nz] * svd.S[:nz]], [svd.V[:, :nz].T.contiguous()]
        self.width = nz
        if nz > self.bound // 2:
            self._to_dense()

    def _to_dense(self) -> None:
        B, A = self.stack()
        self._bs, self._as = [], []
        self.dense_sum = B @ A
        self.width = 0

    def stack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors ``(Bs: out x w, As: w x in)`` of the sum while it is a stack (``w`` may be 0).

        Bs is returned column-major, the layout LAPACK's QR wants (see ``scaled_stack``)."""
        if self.dense_sum is not None:
            raise ValueError("the sum is dense; use .dense()")
        if not self._bs:
            dev = self.device
            return (torch.zeros(self.shape[0], 0, dtype=self.dtype, device=dev),
                    torch.zeros(0, self.shape[1], dtype=self.dtype, device=dev))
        return torch.cat([b.T for b in self._bs], dim=0).T, torch.cat(self._as, dim=0)

    @property
    def is_dense(self) -> bool:
        return self.dense_sum is not None

    def dense(self) -> torch.Tensor:
        """The sum as a dense ``out x in`` matrix (a new tensor)."""
        if self.dense_sum is not None:
            return self.dense_sum.clone()
        B, A = self.stack()
        return B @ A

    @property
    def nbytes(self) -> int:
        """Bytes held now (the stack's factors or the dense sum)."""
        if self.dense_sum is not None:
            return self.dense_sum.numel() * self.dense_sum.element_size()
        return sum(t.numel() * t.element_size() for t in (*self._bs, *self._as))
