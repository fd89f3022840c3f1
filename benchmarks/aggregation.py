"""Aggregation benchmark: flexlora's aggregate + distribute against the dense reference, with the
default exact path (Householder thin QR) and the opt-in Cholesky path side by side.

The dense reference is the published approach: form the dense weighted sum
``sum_k p_k (alpha_k / r_k) B_k A_k`` client by client, take one full SVD, and truncate it to
each distinct client rank. flexlora's path is ``FlexLoRA(max_rank=<largest client rank>)``:
aggregate, then distribute to every distinct rank, with the default ``svd_method="auto"`` (thin
QR up to the dense crossover) and with ``svd_method="cholesky"`` (float64 Grams; where "auto"
would go dense, the Cholesky column runs "auto" too).

Rounds: 10 clients cycling ranks 8/30/200 with independent random factors; 80 heavy-tail-light
clients; and two nearly collinear rounds, as real ones are: 10 clients that received the top r
directions of one global update (singular values decaying over three decades) and moved by
1e-2 or 1e-3 of their factors.

Each (case, method) runs in its own subprocess, so its peak memory (resident set growth over the
inputs) is measured alone; every method is first warmed up on a small round, then timed
``--repeats`` times on the same inputs, and the best time is reported (as ``timeit`` does).
Agreement is checked on random sketches ``P^T X_r Q`` of each rank-r effective update (the same
``P``, ``Q`` for all methods): a disagreement of the full matrices shows in the sketches with
probability one.

Usage::

    python benchmarks/aggregation.py            # all six cases, best of 3 (20-35 minutes on 2 cores; the dense references dominate)
    python benchmarks/aggregation.py --quick    # 1024-sized modules, about a minute
    python benchmarks/aggregation.py --device cuda   # every method on the GPU (scripts/gpu-check.sh)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from _memory import peak_mib, rss_mib

RANKS = (8, 30, 200)
ALPHA = 16.0
SKETCH = 16


def make_round(out_f: int, in_f: int, scenario: str, seed: int):
    """The round's factors (see the module docstring for the scenarios)."""
    from flexlora.core.distributions import sample_client_types

    g = torch.Generator().manual_seed(seed)
    if scenario.startswith("80-"):
        types = sample_client_types(80, "heavy-tail-light", seed=seed)
        # 4096 x 4096 stands for an attention projection, 4096 x 11008 for an MLP one.
        ranks = [t.attention_rank if out_f == in_f else t.mlp_rank for t in types]
    else:
        ranks = [RANKS[i % 3] for i in range(10)]
    factors, sizes = [], []
    if scenario.startswith("10-collinear-"):
        noise = float(scenario.rsplit("-", 1)[1].replace("e", "e-"))
        top = max(ranks)
        sv = torch.logspace(0, -3, top, dtype=torch.float64).sqrt()
        qb, _ = torch.linalg.qr(torch.randn(out_f, top, generator=g, dtype=torch.float64))
        qa, _ = torch.linalg.qr(torch.randn(in_f, top, generator=g, dtype=torch.float64))
        gb, ga = qb * sv, (qa * sv).T
        for r in ranks:
            A = ga[:r] + noise * torch.randn(r, in_f, generator=g, dtype=torch.float64) / in_f**0.5
            B = (r / ALPHA) * (gb[:, :r] + noise * torch.randn(out_f, r, generator=g, dtype=torch.float64) / out_f**0.5)
            factors.append((A.float(), B.float()))
            sizes.append(int(torch.randint(20, 200, (1,), generator=g)))
        return factors, sizes, ranks
    for r in ranks:
        A = torch.randn(r, in_f, generator=g) / in_f**0.5
        B = torch.randn(out_f, r, generator=g) / r**0.5
        factors.append((A, B))
        sizes.append(int(torch.randint(20, 200, (1,), generator=g)))
    return factors, sizes, ranks


def run_flexlora(factors, sizes, ranks, svd_method="auto"):
    import flexlora

    updates = [flexlora.ClientUpdate({"m": f}, num_examples=n, alpha=ALPHA) for f, n in zip(factors, sizes)]
    agg = flexlora.get_aggregator("flexlora", max_rank=max(ranks), svd_method=svd_method)
    state = agg.aggregate(updates)
    out = {r: agg.distribute(state, rank=r, alpha=ALPHA)["m"] for r in sorted(set(ranks))}
    method = state.modules["m"].svd.method
    return out, method


def run_dense(factors, sizes, ranks):
    total = float(sum(sizes))
    dense = None
    for (A, B), n, r in zip(factors, sizes, ranks):
        term = (n / total) * (ALPHA / r) * (B @ A)
        dense = term if dense is None else dense.add_(term)
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    out = {}
    for r in sorted(set(ranks)):
        out[r] = (Vh[:r].clone(), U[:, :r] * S[:r] * (r / ALPHA))
    return out, "dense"


def _on(device: str, rnd):
    factors, sizes, ranks = rnd
    return [(a.to(device), b.to(device)) for a, b in factors], sizes, ranks


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args) -> None:
    torch.manual_seed(0)
    factors, sizes, ranks = _on(args.device, make_round(args.out, args.inp, args.scenario, args.seed))
    def cholesky(factors, sizes, ranks):
        A, B = factors[0]
        thin = sum(ranks) <= 0.85 * min(B.shape[0], A.shape[1])
        return run_flexlora(factors, sizes, ranks, svd_method="cholesky" if thin else "auto")

    fn = {"flexlora": run_flexlora, "cholesky": cholesky, "dense": run_dense}[args.worker]
    if args.worker != "dense":
        import flexlora  # noqa: F401  (import cost is not part of the timing)
    # Warm up every method the same way (thread pool, LAPACK workspaces) on a small round, so the
    # timed call measures the algorithm and not the first-call start-up of the process.
    fn(*_on(args.device, make_round(1024, 1024, args.scenario, args.seed + 1)))
    _sync(args.device)
    base_rss = rss_mib()
    base_peak = peak_mib()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out, path = fn(factors, sizes, ranks)
        _sync(args.device)  # CUDA runs asynchronously: time the work, not its launch
        times.append(time.perf_counter() - t0)
    # Best of the repeats, as timeit does: on a shared machine noise only ever adds time.
    seconds = min(times)
    peak = max(peak_mib() - max(base_peak, base_rss), 0.0)
    g = torch.Generator().manual_seed(1234)
    P = torch.randn(args.out, SKETCH, generator=g, dtype=torch.float64)
    Q = torch.randn(args.inp, SKETCH, generator=g, dtype=torch.float64)
    sketches = {}
    for r, (A, B) in out.items():
        A, B = A.cpu(), B.cpu()
        # P^T (alpha/r B A) Q without forming the dense product.
        sk = (ALPHA / r) * ((P.T @ B.double()) @ (A.double() @ Q))
        sketches[str(r)] = sk.flatten().tolist()
    json.dump(
        {"seconds": seconds, "peak_mib": peak, "path": path, "R": sum(ranks), "sketches": sketches},
        sys.stdout,
    )


def run_case(out_f: int, in_f: int, scenario: str, seed: int, repeats: int, device: str = "cpu") -> dict:
    res = {}
    for method in ("flexlora", "cholesky", "dense"):
        cmd = [sys.executable, __file__, "--worker", method, "--out", str(out_f), "--inp", str(in_f),
               "--scenario", scenario, "--seed", str(seed), "--repeats", str(repeats), "--device", device]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"worker failed ({method}, {out_f}x{in_f}, {scenario}):\n{proc.stderr}")
        res[method] = json.loads(proc.stdout)
    err = {"flexlora": 0.0, "cholesky": 0.0}
    for r, sk in res["dense"]["sketches"].items():
        ref = torch.tensor(sk, dtype=torch.float64)
        for m in err:
            got = torch.tensor(res[m]["sketches"][r], dtype=torch.float64)
            err[m] = max(err[m], float((got - ref).norm() / ref.norm()))
    return {
        "case": f"{out_f}x{in_f}",
        "scenario": scenario,
        "R": res["flexlora"]["R"],
        "path": res["flexlora"]["path"],
        "flexlora_s": res["flexlora"]["seconds"],
        "cholesky_s": res["cholesky"]["seconds"],
        "cholesky_path": res["cholesky"]["path"],
        "dense_s": res["dense"]["seconds"],
        "speedup": res["dense"]["seconds"] / res["flexlora"]["seconds"],
        "cholesky_vs_default": res["flexlora"]["seconds"] / res["cholesky"]["seconds"],
        "flexlora_peak_mib": res["flexlora"]["peak_mib"],
        "cholesky_peak_mib": res["cholesky"]["peak_mib"],
        "dense_peak_mib": res["dense"]["peak_mib"],
        "max_rel_diff": err["flexlora"],
        "cholesky_max_rel_diff": err["cholesky"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1024-sized modules (a smoke run)")
    ap.add_argument("--tiny", action="store_true", help="one 256 x 256 case (scripts/gpu-check.sh's dry run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per method and case; the best is reported")
    ap.add_argument("--device", default="cpu", help="torch device of every method (cpu, cuda, cuda:1)")
    ap.add_argument("--worker", choices=("flexlora", "cholesky", "dense"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--inp", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--scenario", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    shapes = [(256, 256)] if args.tiny else [(1024, 1024), (1024, 2752)] if args.quick else [(4096, 4096),
                                                                                                (4096, 11008)]
    rows = []
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device here")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; ranks {RANKS}, "
          f"alpha {ALPHA}")
    header = f"{'module':>11} {'clients':>20} {'R':>5} {'path':>5} {'flexlora s':>10} {'dense s':>8} {'vs dense':>8} " \
             f"{'flex MiB':>9} {'dense MiB':>9} {'rel diff':>8} | {'chol ran':>8} {'chol s':>7} {'vs default':>10} {'chol diff':>9}"
    print(header)
    cases = [(shape, sc) for shape in shapes for sc in ("10-mixed", "80-heavy-tail-light")]
    cases += [(shapes[0], sc) for sc in ("10-collinear-1e2", "10-collinear-1e3")]
    if args.tiny:
        cases = [(shapes[0], "10-mixed")]
    for (out_f, in_f), scenario in cases:
        row = run_case(out_f, in_f, scenario, args.seed, args.repeats, args.device)
        rows.append(row)
        print(f"{row['case']:>11} {scenario:>20} {row['R']:>5} {row['path']:>5} {row['flexlora_s']:>10.3f} "
              f"{row['dense_s']:>8.2f} {row['speedup']:>7.1f}x {row['flexlora_peak_mib']:>9.0f} "
              f"{row['dense_peak_mib']:>9.0f} {row['max_rel_diff']:>8.1e} | {row['cholesky_path']:>8} "
              f"{row['cholesky_s']:>7.3f} {row['cholesky_vs_default']:>9.2f}x {row['cholesky_max_rel_diff']:>9.1e}",
              flush=True)
    worst = min(r["speedup"] for r in rows)
    disagree = max(r["max_rel_diff"] for r in rows)
    print(f"slowest speedup {worst:.1f}x; Cholesky path against the default "
          f"{min(r['cholesky_vs_default'] for r in rows):.2f}x to {max(r['cholesky_vs_default'] for r in rows):.2f}x; "
          f"largest relative difference of the results {disagree:.1e}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if disagree > 1e-4:
        raise SystemExit("results disagree with the dense reference")


if __name__ == "__main__":
    main()
