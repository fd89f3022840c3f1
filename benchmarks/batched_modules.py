"""One round's server SVDs for every adapted module of SmolLM2-135M: one call per module against
modules of one shape batched (``svd_of_products(batch=True)``), side by side in this run.

SmolLM2-135M has 30 layers of 7 adapted modules: q and o (576 x 576), k and v (192 x 576),
gate and up (1536 x 576), down (576 x 1536). The clients' stacked factors are random (the time of
the thin-QR path does not depend on the values), with the rank mixes of a few rounds of 5 clients
(the stack width R is the sum of the ranks; stacks wider than 0.85 min(out, in) take the dense path
and are never batched). Times are best of 3, interleaved; the ratio is unbatched / batched time,
so above 1 means batching pays. On a CUDA device (if there is one) the same is run there.

Usage::

    python benchmarks/batched_modules.py
"""

from __future__ import annotations

import time

import torch

from flexlora.core.lowrank import svd_of_products

LAYERS = 30
MODULES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576),
           "up": (1536, 576), "down": (576, 1536)}
# Rank mixes of 5 clients (attention, MLP ranks are the same here): R = sum.
MIXES = {"homo rank 8 (R=40)": [8] * 5, "ranks 8,8,8,30,30 (R=84)": [8, 8, 8, 30, 30],
         "ranks 8,30,30,30,30 (R=128)": [8, 30, 30, 30, 30], "ranks 8,8,30,30,200 (R=276)": [8, 8, 30, 30, 200],
         "ranks 8,8,30,200,200 (R=446)": [8, 8, 30, 200, 200]}
KEEP = 200


def make_pairs(ranks: list[int], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(sum(ranks))
    R = sum(ranks)
    pairs = []
    for _ in range(LAYERS):
        for out_f, in_f in MODULES.values():
            B = torch.randn(R, out_f, generator=g).T  # column-major, as the aggregator stacks it
            A = torch.randn(R, in_f, generator=g)
            pairs.append((B.to(device), A.to(device)))
    return pairs


def timed(pairs: list[tuple[torch.Tensor, torch.Tensor]], batch: bool) -> float:
    t = time.perf_counter()
    svd_of_products(pairs, batch=batch, max_rank=KEEP)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {LAYERS * len(MODULES)} modules, top {KEEP} kept")
    print("| device | clients' ranks | one call per module | batched | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for device in devices:
        for label, ranks in MIXES.items():
            pairs = make_pairs(ranks, device)
            svd_of_products(pairs[:7], batch=True, max_rank=KEEP)  # warm-up (CUDA context, LAPACK)
            single, batched = [], []
            for _ in range(3):
                single.append(timed(pairs, batch=False))
                batched.append(timed(pairs, batch=True))
            s, b = min(single), min(batched)
            print(f"| {device.type} | {label} | {s:.3f} s | {b:.3f} s | {s / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
