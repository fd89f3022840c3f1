"""The exact SVD paths on a real round: SmolLM2-135M-Instruct clients trained with flexlora's own
engine (slow; `make test-slow`).

In round 2 every client starts from the distributed global update and moves a little, so the
stacked factors of a module are nearly collinear: the case the Cholesky path must either hold to
1e-5 or hand over to Householder QR. The expectation is independent: the float64 SVD of the dense
sum ``sum_k p_k s_k B_k A_k`` (Eckart-Young: the kept triplets are as good as the best rank-k
approximation).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.long]  # a real training run; CI leaves it out


def test_cholesky_and_qr_paths_hold_1e5_on_a_real_smollm2_round(tmp_path: Path) -> None:
    from flexlora.core.aggregators.base import scaled_stack
    from flexlora.core.lowrank import relative_error, svd_of_product
    from flexlora.core.types import client_weights
    from flexlora.engines.config import load_config
    from flexlora.engines.simulation import Simulation

    cfg = load_config(None, [
        "rounds=2", "num_clients=4", "clients_per_round=4", "local_steps=2", "train.lr=1e-3",
        "aggregator=flexlora", "rank_distribution=uniform", "lora.types=[[4, 4], [8, 8], [16, 16]]",
        "eval.every=0", "eval.max_tasks=1", "eval.max_examples_per_task=1", "eval.max_new_tokens=2",
    ])
    sim = Simulation(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    rounds: list[list] = []
    aggregator = sim.method.aggregator
    begin = aggregator.begin_round

    def capturing_begin(previous, **kw):
        acc = begin(previous, **kw)
        got: list = []
        rounds.append(got)
        add = acc.add

        def capture(update, **kw):
            got.append(update)
            return add(update, **kw)

        acc.add = capture
        return acc

    aggregator.begin_round = capturing_begin
    sim.run()
    assert len(rounds) == 2 and len(rounds[1]) == 4
    updates = rounds[1]  # clients that started from the round-1 global update
    weights = client_weights(updates)
    checked = ran = 0
    for module in updates[0].factors:
        Bc, Ac = scaled_stack(updates, module, weights)
        R = Bc.shape[1]
        if R > min(Bc.shape[0], Ac.shape[1]):
            continue
        k = min(16, R)
        U, S, Vh = torch.linalg.svd(Bc.double() @ Ac.double(), full_matrices=False)
        best = (U[:, :k] * S[:k]) @ Vh[:k]
        for method in ("cholesky", "qr"):
            res = svd_of_product(Bc, Ac, method=method, max_rank=k)
            assert relative_error(res.dense(), best) <= 1e-5, (module, method, res.method)
            ran += method == "cholesky" and res.method == "cholesky"
        checked += 1
    assert checked >= 30  # every attention and MLP projection of the 30 layers that fits
    # The clients' stacked B is well conditioned here (AdamW moves the small B a lot), so the
    # Cholesky path must have run, not handed every module to Householder.
    assert ran >= checked // 2, f"Cholesky path ran on only {ran} of {checked} modules"
