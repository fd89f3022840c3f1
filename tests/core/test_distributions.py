"""Client types and the distributions of clients over them (method.md section 3)."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from flexlora.core import (
    PAPER_CLIENT_TYPES,
    ClientType,
    available_distributions,
    distribution_probabilities,
    module_group,
    sample_client_types,
    types_from_budget,
    types_from_ranks,
)
from flexlora.core.distributions import type_counts

NAMES = ["heavy-tail-light", "heavy-tail-strong", "homo", "normal", "uniform"]


def test_paper_types_table():
    # method.md section 3: (attention, MLP) ranks 8/8, 30/30, 30/200, 200/200, alpha 16
    assert [(t.attention_rank, t.mlp_rank, t.alpha) for t in PAPER_CLIENT_TYPES] == [
        (8, 8, 16.0), (30, 30, 16.0), (30, 200, 16.0), (200, 200, 16.0)
    ]
    assert [t.name for t in PAPER_CLIENT_TYPES] == ["type1", "type2", "type3", "type4"]


def test_probabilities_match_method_definitions():
    assert available_distributions() == NAMES
    assert distribution_probabilities("homo") == [1.0, 0.0, 0.0, 0.0]
    assert distribution_probabilities("uniform") == pytest.approx([0.25] * 4)
    assert distribution_probabilities("heavy-tail-light") == pytest.approx([0.8, 0.2 / 3, 0.2 / 3, 0.2 / 3])
    assert distribution_probabilities("heavy-tail-strong") == pytest.approx([0.2 / 3, 0.2 / 3, 0.2 / 3, 0.8])
    normal = distribution_probabilities("normal")
    # most mass on types 2 and 3, symmetric, and not the reference code's shift towards types 3-4
    assert normal[1] + normal[2] > 0.5
    assert normal[1] > normal[0] and normal[2] > normal[3]
    assert normal[0] == pytest.approx(normal[3]) and normal[1] == pytest.approx(normal[2])
    # golden: Gaussian, sigma 1, centre 1.5: exp(-1.125) / (2 (exp(-1.125) + exp(-0.125)))
    p0 = math.exp(-1.125) / (2 * (math.exp(-1.125) + math.exp(-0.125)))
    assert normal == pytest.approx([p0, 0.5 - p0, 0.5 - p0, p0])
    assert p0 == pytest.approx(0.1345, abs=1e-4)
    for name in NAMES:
        p = distribution_probabilities(name)
        assert sum(p) == pytest.approx(1.0) and min(p) >= 0


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_probabilities_for_other_type_counts(k):
    for name in NAMES:
        p = distribution_probabilities(name, k)
        assert len(p) == k and sum(p) == pytest.approx(1.0)
    if k > 1:
        assert distribution_probabilities("heavy-tail-strong", k)[-1] == pytest.approx(0.8)
        normal = distribution_probabilities("normal", k)
        assert normal == pytest.approx(normal[::-1])


def test_unknown_distribution():
    with pytest.raises(ValueError, match="unknown rank distribution 'zipf'") as exc:
        distribution_probabilities("zipf")
    for name in NAMES:
        assert name in str(exc.value)
    with pytest.raises(ValueError, match="zipf"):
        sample_client_types(10, "zipf")
    with pytest.raises(ValueError, match="num_types"):
        distribution_probabilities("uniform", 0)


@pytest.mark.parametrize("name", NAMES)
def test_realised_frequencies_match_probabilities(name):
    n = 20_000
    drawn = sample_client_types(n, name, seed=11)
    counts = Counter(t.name for t in drawn)
    for t, p in zip(PAPER_CLIENT_TYPES, distribution_probabilities(name)):
        se = math.sqrt(max(p * (1 - p), 1e-12) / n)
        freq = counts.get(t.name, 0) / n
        assert abs(freq - p) <= 5 * se, (name, t.name, freq, p)


def test_seeded_reproducibility():
    a = sample_client_types(200, "uniform", seed=3)
    b = sample_client_types(200, "uniform", seed=3)
    c = sample_client_types(200, "uniform", seed=4)
    assert a == b
    assert a != c
    assert all(isinstance(t, ClientType) for t in a)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 7, 10, 33, 1000])
def test_exact_counts_within_one(name, n):
    drawn = sample_client_types(n, name, seed=0, exact=True)
    assert len(drawn) == n
    counts = type_counts(drawn)
    for t, p in zip(PAPER_CLIENT_TYPES, distribution_probabilities(name)):
        assert abs(counts.get(t.name, 0) - p * n) < 1.0 + 1e-9
    # shuffled, not sorted by type
    if name == "uniform" and n == 1000:
        assert [t.name for t in drawn] != sorted(t.name for t in drawn)


def test_user_defined_types():
    tiny = (ClientType("small", 2, 4, alpha=8.0), ClientType("large", 16, 16, alpha=32.0))
    drawn = sample_client_types(4000, "heavy-tail-strong", types=tiny, seed=1)
    assert set(drawn) <= set(tiny)
    share = sum(t.name == "large" for t in drawn) / 4000
    assert abs(share - 0.8) <= 5 * math.sqrt(0.16 / 4000)
    assert sample_client_types(5, "homo", types=tiny) == [tiny[0]] * 5
    with pytest.raises(ValueError, match="types"):
        sample_client_types(5, "uniform", types=())
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_clients"):
            sample_client_types(bad, "uniform")  # type: ignore[arg-type]


def test_client_type_validation():
    for bad in (0, -2, 3.0, True):
        with pytest.raises(ValueError, match="attention_rank"):
            ClientType("x", bad, 4)  # type: ignore[arg-type]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            ClientType("x", 4, 4, alpha=bad)
    with pytest.raises(ValueError, match="group"):
        ClientType("x", 4, 4).rank_for("embedding")


def test_types_from_ranks():
    out = types_from_ranks([4, (8, 16), np.int64(2)], alpha=32.0)
    assert [(t.attention_rank, t.mlp_rank, t.alpha) for t in out] == [(4, 4, 32.0), (8, 16, 32.0), (2, 2, 32.0)]
    assert out[1].name == "r8-16"


LLAMA = {
    "model.layers.0.self_attn.q_proj": (64, 64),
    "model.layers.0.self_attn.k_proj": (16, 64),
    "model.layers.0.self_attn.v_proj": (16, 64),
    "model.layers.0.self_attn.o_proj": (64, 64),
    "model.layers.0.mlp.gate_proj": (40, 64),
    "model.layers.0.mlp.up_proj": (40, 64),
    "model.layers.0.mlp.down_proj": (64, 40),
}
TYPES = (
    ClientType("t1", 2, 2),
    ClientType("t2", 6, 3),
    ClientType("t3", 4, 12),
    ClientType("t4", 24, 24),  # capped at 16 on k/v
)


def _brute_cost(t: ClientType) -> int:
    total = 0
    for m, (o, i) in LLAMA.items():
        r = t.attention_rank if "self_attn" in m else t.mlp_rank
        total += min(r, o, i) * (o + i)
    return total


def test_module_ranks_cap_and_trainable_params():
    ranks = TYPES[3].module_ranks(LLAMA)
    assert ranks["model.layers.0.self_attn.k_proj"] == 16 and ranks["model.layers.0.self_attn.q_proj"] == 24
    # type3 = (30, 200): attention 30 (16 on the 16-wide k/v), MLP 200 capped at min(40, 64)
    assert PAPER_CLIENT_TYPES[2].module_ranks(LLAMA) == {
        m: (min(30, *LLAMA[m]) if "self_attn" in m else 40) for m in LLAMA
    }
    for t in TYPES:
        assert t.trainable_params(LLAMA) == _brute_cost(t)
    # explicit groups override the name
    assert TYPES[2].module_ranks({"blk.w": (50, 50)}, groups={"blk.w": "mlp"}) == {"blk.w": 12}


def test_types_from_budget_brute_force():
    costs = {t.name: _brute_cost(t) for t in TYPES}
    assert len(set(costs.values())) == len(TYPES)  # no ties on this model
    smallest = min(costs.values())
    budgets = sorted(set(costs.values()) | {c - 1 for c in costs.values()} | {c + 1 for c in costs.values()} | {10**9})
    budgets = [b for b in budgets if b >= smallest]
    chosen = types_from_budget(budgets, LLAMA, types=TYPES)
    for b, t in zip(budgets, chosen):
        best = max((c, name) for name, c in costs.items() if c <= b)
        assert t.name == best[1], (b, t.name, best)
    # every subset order of candidates gives the same choice
    for perm in itertools.permutations(TYPES):
        assert types_from_budget(budgets, LLAMA, types=perm) == chosen
    with pytest.raises(ValueError, match=r"client 1: budget .* below the smallest type 't1'"):
        types_from_budget([10**9, smallest - 1], LLAMA, types=TYPES)


def test_types_from_budget_bytes():
    cost_t2 = _brute_cost(TYPES[1])
    chosen = types_from_budget([cost_t2 * 16, cost_t2 * 16 - 1], LLAMA, types=TYPES, unit="bytes")
    assert [t.name for t in chosen] == ["t2", "t1"]
    chosen = types_from_budget([cost_t2 * 2], LLAMA, types=TYPES, unit="bytes", bytes_per_param=2.0)
    assert chosen[0].name == "t2"
    with pytest.raises(ValueError, match="unit"):
        types_from_budget([1], LLAMA, unit="flops")
    with pytest.raises(ValueError, match="shapes"):
        types_from_budget([1], {})


@pytest.mark.parametrize(
    "name,group",
    [
        ("model.layers.0.self_attn.q_proj", "attention"),
        ("model.layers.11.self_attn.k_proj", "attention"),
        ("model.layers.2.self_attn.v_proj", "attention"),
        ("model.layers.2.self_attn.o_proj", "attention"),
        ("model.layers.0.mlp.gate_proj", "mlp"),
        ("model.layers.0.mlp.up_proj", "mlp"),
        ("model.layers.5.mlp.down_proj", "mlp"),
        ("q_proj", "attention"),
        ("down_proj", "mlp"),
        ("transformer.h.0.attn.c_proj", "attention"),
        ("transformer.h.0.mlp.c_proj", "mlp"),
    ],
)
def test_module_group(name, group):
    assert module_group(name) == group


@pytest.mark.parametrize("name", ["lm_head", "model.embed_tokens", "model.layers.0.input_layernorm"])
def test_module_group_unknown(name):
    with pytest.raises(ValueError, match="attention or MLP"):
        module_group(name)


def test_types_from_ranks_refuses_what_int_would_bend() -> None:
    from flexlora.core.distributions import types_from_ranks

    assert [t.name for t in types_from_ranks([2, (3, 4), [5, 6]])] == ["r2-2", "r3-4", "r5-6"]
    for bad in (True, (2.9, 4), (1, 2, 3), 2.0, "8"):
        with pytest.raises(ValueError, match=r"ranks\[1\] must be a positive int or \(attention_rank, mlp_rank\)"):
            types_from_ranks([2, bad])


def test_types_from_budget_needs_candidates() -> None:
    from flexlora.core.distributions import types_from_budget

    with pytest.raises(ValueError, match="types is empty"):
        types_from_budget([10.0], {"m": (8, 8)}, types=[])


def test_types_from_budget_refuses_malformed_input_by_name() -> None:
    import numpy as np

    from flexlora.core.distributions import PAPER_CLIENT_TYPES, ClientType, types_from_budget

    shapes = {"layers.0.self_attn.q_proj": (64, 64), "layers.0.mlp.up_proj": (128, 64)}
    big = 10 * PAPER_CLIENT_TYPES[-1].trainable_params(shapes)
    assert types_from_budget(np.array([big]), shapes)[0] == PAPER_CLIENT_TYPES[-1]  # arrays are fine
    for args, kwargs, match in (
        (([float("nan")], shapes), {}, "client 0: budget must be a positive finite number"),
        (([True], shapes), {}, "client 0: budget must be a positive finite number"),
        ((big, shapes), {}, "budgets must be a sequence"),
        (([big], {"q_proj": (0, 64)}), {}, r"shapes must map each module to \(out, in\) positive ints"),
        (([big], {"q_proj": (-5, 64)}), {}, r"shapes must map each module to \(out, in\) positive ints"),
        (([big], shapes), {"unit": "bytes", "bytes_per_param": 0}, "bytes_per_param must be a positive number"),
    ):
        with pytest.raises(ValueError, match=match):
            types_from_budget(*args, **kwargs)
    assert ClientType("t", np.int64(4), np.int64(8)).attention_rank == 4  # numpy ints are plain ranks
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        ClientType("t", 4, 8, alpha=True)
