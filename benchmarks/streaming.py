"""Streaming aggregation against batch aggregation: server memory and time per round.

Batch (``FlexLoRA.aggregate``) needs every sampled client's factors at once; streaming
(``FlexLoRA.begin_round`` -> ``add`` per reply -> ``finish``) folds each reply into a running
:class:`flexlora.core.lowrank_sum.LowRankSum` as it arrives, so the server holds the running sum and
one reply. Both give the same global update (checked here on random sketches ``P^T G Q`` of the
kept top-``max_rank`` update).

Part 1: one 4096 x 4096 module, 10, 40 and 80 clients per round, ranks cycling 8/30/200. Each
(clients, method) runs in its own subprocess; a client's factors are generated when it "arrives"
(from its own seed), so the batch worker holds all of them, as a batch server must, and the
streaming worker one at a time. Peak memory is the growth of the resident set over the worker's
state after warm-up. Time is the server's: the aggregation alone (batch) or every fold plus the
finish (streaming).

Part 2: the full-round server time of SmolLM2-135M (all 210 adapted modules: q, k, v, o, gate,
up, down of 30 layers), 5 clients of the paper's types drawn uniformly, batch against streaming.

Usage::

    python benchmarks/streaming.py           # both parts (several minutes on 2 cores)
    python benchmarks/streaming.py --quick   # 1024 x 1024 and 3 layers, seconds
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
# SmolLM2-135M: hidden 576, 3 KV heads of 64, MLP 1536, 30 layers (its config.json).
SMOLLM2 = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
           "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
SMOLLM2_LAYERS = 30


def client(k: int, seed: int, shapes: dict[str, tuple[int, int]], ranks: dict[str, int]):
    import flexlora

    g = torch.Generator().manual_seed(seed * 100_003 + k)
    factors = {}
    for m, (o, i) in shapes.items():
        r = ranks[m]
        factors[m] = (torch.randn(r, i, generator=g) / i**0.5, torch.randn(o, r, generator=g) / r**0.5)
    n = int(torch.randint(20, 200, (1,), generator=g))
    return flexlora.ClientUpdate(factors, num_examples=n, alpha=ALPHA)


def module_round(n_clients: int, size: int) -> tuple[dict, list[dict]]:
    shapes = {"m": (size, size)}
    return shapes, [{"m": min(RANKS[k % 3], size)} for k in range(n_clients)]


def smollm2_round(layers: int, seed: int) -> tuple[dict, list[dict]]:
    from flexlora.core.distributions import sample_client_types

    shapes = {f"{layer}.{m}": s for layer in range(layers) for m, s in SMOLLM2.items()}
    types = sample_client_types(5, "uniform", seed=seed)
    ranks = []
    for t in types:
        ranks.append({name: min(t.attention_rank if name.split(".")[1] in "qkvo" else t.mlp_rank, *s)
                      for name, s in shapes.items()})
    return shapes, ranks


def aggregate(method: str, shapes, ranks, seed: int):
    import flexlora

    max_rank = max(max(r.values()) for r in ranks)
    agg = flexlora.get_aggregator("flexlora", max_rank=max_rank)
    if method == "batch":
        updates = [client(k, seed, shapes, r) for k, r in enumerate(ranks)]
        t0 = time.perf_counter()
        state = agg.aggregate(updates)
        return state, time.perf_counter() - t0
    acc = agg.begin_round(None, ranks=ranks)
    seconds = 0.0
    for k, r in enumerate(ranks):
        u = client(k, seed, shapes, r)  # the reply arrives
        t0 = time.perf_counter()
        acc.add(u, copy=False)  # as the engines add a reply they drop at once
        seconds += time.perf_counter() - t0
        del u
    t0 = time.perf_counter()
    state = acc.finish()
    return state, seconds + time.perf_counter() - t0


def worker(args) -> None:
    import flexlora  # noqa: F401  (import cost is not part of the measurement)

    if args.part == "module":
        shapes, ranks = module_round(args.clients, args.size)
        warm = module_round(3, 256)
    else:
        shapes, ranks = smollm2_round(args.layers, args.seed)
        warm = smollm2_round(1, args.seed)
    aggregate(args.worker, *warm, args.seed + 1)  # thread pool and LAPACK workspaces
    base = max(peak_mib(), rss_mib())
    state, seconds = aggregate(args.worker, shapes, ranks, args.seed)
    peak = max(peak_mib() - base, 0.0)
    g = torch.Generator().manual_seed(1234)
    sketches = {}
    for m, st in list(state.modules.items())[:4]:
        o, i = st.shape
        P = torch.randn(o, SKETCH, generator=g, dtype=torch.float64)
        Q = torch.randn(i, SKETCH, generator=g, dtype=torch.float64)
        svd = st.svd
        sketches[m] = (((P.T @ svd.U.double()) * svd.S.double()) @ (svd.V.double().T @ Q)).flatten().tolist()
    R = sum(sum(r.values()) for r in ranks) // len(shapes)
    json.dump({"seconds": seconds, "peak_mib": peak, "R": R, "sketches": sketches}, sys.stdout)


def run(part: str, method: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--part", part]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({part}, {method}, {kw}):\n{proc.stderr}")
    return json.loads(proc.stdout)


def compare(a: dict, b: dict) -> float:
    err = 0.0
    for m, sk in a["sketches"].items():
        x, y = torch.tensor(sk, dtype=torch.float64), torch.tensor(b["sketches"][m], dtype=torch.float64)
        err = max(err, float((x - y).norm() / y.norm()))
    return err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1024 x 1024 and 3 SmolLM2 layers (a smoke run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    ap.add_argument("--worker", choices=("batch", "stream"), help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=("module", "smollm2"), help=argparse.SUPPRESS)
    ap.add_argument("--clients", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=4096, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=SMOLLM2_LAYERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    size = 1024 if args.quick else 4096
    layers = 3 if args.quick else SMOLLM2_LAYERS
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ranks cycling {RANKS}, alpha {ALPHA}")
    print(f"{'case':>26} {'R':>6} {'batch s':>8} {'stream s':>9} {'time ratio':>10} {'batch MiB':>9} "
          f"{'stream MiB':>10} {'memory ratio':>12} {'max rel diff':>12}")
    cases = [("module", {"clients": k, "size": size}, f"{size}x{size}, {k} clients") for k in (10, 40, 80)]
    cases.append(("smollm2", {"layers": layers}, f"SmolLM2-135M, {layers} layers x 7"))
    for part, kw, label in cases:
        b = run(part, "batch", seed=args.seed, **kw)
        s = run(part, "stream", seed=args.seed, **kw)
        row = {"case": label, "R": b["R"], "batch_s": b["seconds"], "stream_s": s["seconds"],
               "batch_peak_mib": b["peak_mib"], "stream_peak_mib": s["peak_mib"], "max_rel_diff": compare(s, b)}
        rows.append(row)
        print(f"{label:>26} {row['R']:>6} {row['batch_s']:>8.2f} {row['stream_s']:>9.2f} "
              f"{row['stream_s'] / row['batch_s']:>9.2f}x {row['batch_peak_mib']:>9.0f} {row['stream_peak_mib']:>10.0f} "
              f"{row['stream_peak_mib'] / max(row['batch_peak_mib'], 1e-9):>11.2f}x {row['max_rel_diff']:>12.1e}",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if max(r["max_rel_diff"] for r in rows) > 1e-4:
        raise SystemExit("streaming and batch results disagree")


if __name__ == "__main__":
    main()
