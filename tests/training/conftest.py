"""Shared fixtures for the training tests: the tiny seeded Llama and helpers around it."""

from __future__ import annotations

import pytest
import torch

from flexlora.training.models import load_base_model, model_lora_targets

TINY = "builtin:tiny-llama"


@pytest.fixture()
def tiny():
    """A fresh ``(model, tokenizer)`` of ``builtin:tiny-llama`` (hidden 64, 2 layers), seed 0."""
    return load_base_model(TINY, seed=0)


@pytest.fixture()
def tiny_model(tiny):
    return tiny[0]


def paper_like_ranks(model: torch.nn.Module, attention: int = 8, mlp: int = 200) -> dict[str, int]:
    """Per-module ranks by group, capped at ``min(out, in)`` of each module."""
    ranks = {}
    for name, group in model_lora_targets(model).items():
        lin = model.get_submodule(name)
        r = attention if group == "attention" else mlp
        ranks[name] = min(r, lin.out_features, lin.in_features)
    return ranks


def random_factors(model: torch.nn.Module, ranks: dict[str, int], *, seed: int = 0, scale: float = 0.1):
    """Random ``{module: (A, B)}`` with ``A: (r, in)``, ``B: (out, r)``; both non-zero."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, r in ranks.items():
        lin = model.get_submodule(name)
        a = torch.randn(r, lin.in_features, generator=gen) * scale
        b = torch.randn(lin.out_features, r, generator=gen) * scale
        out[name] = (a, b)
    return out


def make_features(n: int, *, seed: int = 0, min_len: int = 5, max_len: int = 12, prompt_len: int = 2, vocab: int = 250):
    """Random token features of varied length; the first ``prompt_len`` labels are masked."""
    gen = torch.Generator().manual_seed(seed)
    feats = []
    for _ in range(n):
        k = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = torch.randint(0, vocab, (k,), generator=gen).tolist()
        labels = [-100] * prompt_len + ids[prompt_len:]
        feats.append({"input_ids": ids, "attention_mask": [1] * k, "labels": labels})
    return feats


@pytest.fixture()
def helpers():
    """The helper functions above, as a fixture (test modules cannot import each other's conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        paper_like_ranks=paper_like_ranks, random_factors=random_factors, make_features=make_features
    )
