"""The public names the README promises, used exactly as it shows them."""

from __future__ import annotations

import torch

import flexlora


def test_readme_aggregation_snippet() -> None:
    g = torch.Generator().manual_seed(0)
    name = "layers.0.self_attn.q_proj"

    def update(r: int, n: int, alpha: float) -> flexlora.ClientUpdate:
        A, B = torch.randn(r, 48, generator=g), torch.randn(40, r, generator=g)
        return flexlora.ClientUpdate(factors={name: (A, B)}, num_examples=n, alpha=alpha)

    u1, u2, u3 = update(4, 120, 16.0), update(8, 30, 8.0), update(2, 50, 32.0)
    agg = flexlora.get_aggregator("flexlora")
    state = agg.aggregate([u1, u2, u3])
    out = agg.distribute(state, rank=8, alpha=16.0)
    A, B = out[name]
    assert A.shape == (8, 48) and B.shape == (40, 8)
    # The dense global update is the p-weighted sum of the clients' effective updates.
    total = 200.0
    want = sum(u.num_examples / total * u.alpha / u.rank(name) * (u.factors[name][1] @ u.factors[name][0])
               for u in (u1, u2, u3))
    assert torch.allclose(flexlora.dense_update(state, name), want, rtol=1e-4, atol=1e-4)
    assert set(flexlora.available_aggregators()) >= {"flexlora", "fedavg", "hetlora", "flora"}


def test_load_base_model_is_exported_lazily() -> None:
    from flexlora.training.models import load_base_model

    assert flexlora.load_base_model is load_base_model
    model, tok = flexlora.load_base_model("builtin:tiny-llama")
    assert model.config.num_hidden_layers == 2 and tok.pad_token is not None
