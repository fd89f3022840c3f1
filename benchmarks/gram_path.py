"""The opt-in float64 Gram exact path against Householder thin QR, one 4096 x 4096 module.

10 clients of ranks 8/30/200 (R = 722), top 200 kept, random factors; best of 3 per method,
both measured in this run, then the cost of the Gram path's parts.

Usage::

    python benchmarks/gram_path.py
"""

import time

import torch

from flexlora.core.lowrank import svd_of_product

torch.manual_seed(0)
out = inn = 4096
ranks = [8, 30, 200] * 3 + [8]
B = torch.cat([torch.randn(out, r) / r**0.5 * 0.1 for r in ranks], 1)
A = torch.cat([torch.randn(r, inn) / inn**0.5 for r in ranks], 0)
B = B.T.contiguous().T  # column-major, as scaled_stack builds it
best = {}
for m in ("gram", "qr", "gram", "qr"):  # interleaved, warm
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        r = svd_of_product(B, A, method=m, max_rank=200)
        ts.append(time.perf_counter() - t)
    best[m] = min(ts)
    print(f"{m:5s} (ran {r.method}): {best[m]:.3f} s")
print(f"gram / qr time ratio: {best['gram'] / best['qr']:.2f}")
Bd = B.double()
t = time.perf_counter(); G = Bd.T @ Bd; print(f"  float64 Gram 4096 x 722: {time.perf_counter() - t:.3f} s")
t = time.perf_counter(); torch.linalg.eigh(G); print(f"  float64 eigh 722: {time.perf_counter() - t:.3f} s")
t = time.perf_counter(); torch.linalg.svd(G); print(f"  float64 SVD 722: {time.perf_counter() - t:.3f} s")
t = time.perf_counter(); torch.geqrf(B); print(f"  float32 geqrf 4096 x 722: {time.perf_counter() - t:.3f} s")
