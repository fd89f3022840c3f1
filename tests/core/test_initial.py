"""The round's shared fresh adapter (flexlora.core.initial)."""

from __future__ import annotations

import math

import pytest
import torch

from flexlora.core.initial import fresh_factors, initial_A

SHAPES = {"m.q": (576, 576), "m.up": (1536, 576), "m.down": (576, 1536)}


def test_a_lower_rank_gets_the_first_rows_of_a_higher_rank() -> None:
    for m, shape in SHAPES.items():
        full = initial_A(shape, 200, seed=3, module=m)
        for r in (1, 8, 30, 199):
            assert torch.equal(initial_A(shape, r, seed=3, module=m), full[:r]), (m, r)


def test_every_client_of_a_seed_gets_the_same_adapter_and_modules_differ() -> None:
    a = fresh_factors(SHAPES, {"m.q": 8, "m.up": 30, "m.down": 8}, seed=11)
    b = fresh_factors(SHAPES, {"m.q": 8, "m.up": 30, "m.down": 8}, seed=11)
    c = fresh_factors(SHAPES, {"m.q": 8, "m.up": 30, "m.down": 8}, seed=12)
    for m in a:
        assert torch.equal(a[m][0], b[m][0])
        assert not torch.equal(a[m][0], c[m][0])
        assert a[m][1].shape == (SHAPES[m][0], a[m][0].shape[0]) and not a[m][1].any()
    # Same input width, different module: independent draws.
    assert not torch.equal(initial_A((576, 576), 8, 11, "x"), initial_A((576, 576), 8, 11, "y"))


def test_the_law_is_peft_default_kaiming_uniform() -> None:
    # PEFT initialises lora_A with kaiming_uniform_(a=sqrt(5)); draw that here independently and
    # compare range and variance with ours (uniform on [-b, b] has variance b^2 / 3).
    in_f = 1536
    ours = initial_A((576, in_f), 200, seed=0, module="m")
    ref = torch.nn.init.kaiming_uniform_(torch.empty(200, in_f), a=math.sqrt(5))
    for x in (ours, ref):
        assert x.abs().max() <= 1 / math.sqrt(in_f)
        assert x.abs().max() > 0.999 / math.sqrt(in_f)
        assert x.var().item() == pytest.approx(1 / (3 * in_f), rel=0.02)
        assert abs(x.mean().item()) < 3 * math.sqrt(1 / (3 * in_f) / x.numel())


def test_bad_ranks_and_modules_are_refused() -> None:
    with pytest.raises(ValueError, match="rank 0"):
        initial_A((8, 4), 0, 0, "m")
    with pytest.raises(ValueError, match="rank 5"):
        initial_A((8, 4), 5, 0, "m")
    with pytest.raises(ValueError, match="no weight shape"):
        fresh_factors({"a": (4, 4)}, {"b": 2}, 0)
