"""Server time of a client-level DP round against the same round without noise.

One 4096 x 4096 module, 10 clients of ranks cycling 8/30/200 (``max_rank`` 200), every client's
contribution clipped (``clip_norm``). Three servers, each measured on the same replies:

- ``clip``: the bound alone, no noise: the exact thin-QR path (the dense matrix is never formed);
- ``dp exact``: Gaussian noise on the sum, so the module's sum is dense, and an exact dense SVD;
- ``dp randomized``: the same noisy sum, top-``max_rank`` randomized SVD
  (``svd_method="randomized"``, 10 oversamples, 2 power iterations).

Each is run ``--repeats`` times after a warm-up; the median is reported with its ratio to
``clip``. The noise is that of ``noise_multiplier = 1`` with ``clip_norm = 1``; each noisy
global is compared with the noiseless one, and the two noisy ones with each other.

Usage::

    python benchmarks/dp_round.py            # 4096 x 4096 (about a minute on 2 cores)
    python benchmarks/dp_round.py --size 1024 --repeats 1   # seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

RANKS = (8, 30, 200)


def replies(size: int, clients: int, seed: int) -> list:
    import flexlora

    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(clients):
        r = min(RANKS[k % 3], size)
        out.append(flexlora.ClientUpdate({"m": (torch.randn(r, size, generator=g) / size**0.5,
                                                torch.randn(size, r, generator=g) / r**0.5)},
                                         num_examples=50, alpha=16.0, client_id=f"c{k}"))
    return out


def server(kind: str, updates: list, max_rank: int):
    from flexlora.core.aggregators import get_aggregator
    from flexlora.core.clipping import GaussianSumNoise

    method = "randomized" if kind == "dp randomized" else "auto"
    agg = get_aggregator("flexlora", max_rank=max_rank, clip_norm=1.0, svd_method=method)
    t0 = time.perf_counter()
    acc = agg.begin_round(None)
    if kind != "clip":
        acc.noise = GaussianSumNoise(std=1.0, clients=len(updates), seed=7)
    for u in updates:
        acc.add(u, copy=False)
    state = acc.finish()
    return state, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    max_rank = min(200, args.size)
    updates = replies(args.size, args.clients, seed=0)
    server("dp exact", replies(256, 3, seed=1), 8)  # warm-up: thread pool, LAPACK workspaces
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.size} x {args.size}, "
          f"{args.clients} clients, max_rank {max_rank}")
    times, states = {}, {}
    for kind in ("clip", "dp exact", "dp randomized"):
        runs = [server(kind, updates, max_rank) for _ in range(args.repeats)]
        states[kind] = runs[-1][0]
        times[kind] = statistics.median(t for _, t in runs)
    for kind, t in times.items():
        print(f"{kind:>14}: {t:7.2f} s  ({t / times['clip']:5.2f}x the round without noise)")
    clean = states["clip"].modules["m"].svd.dense()
    for kind in ("dp exact", "dp randomized"):
        d = states[kind].modules["m"].svd.dense()
        print(f"{kind:>14}: rank-{max_rank} global vs the noiseless one: relative difference "
              f"{float((d - clean).norm() / clean.norm()):.3g}")
    exact, fast = states["dp exact"].modules["m"].svd.dense(), states["dp randomized"].modules["m"].svd.dense()
    print(f"randomized vs exact rank-{max_rank} truncation of the noisy sum: relative difference "
          f"{float((exact - fast).norm() / exact.norm()):.3g} (a flat noise spectrum has no gap to find)")

if __name__ == "__main__":
    main()
