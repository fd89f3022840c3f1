"""Collating tokenised features into padded batches, and the seeded order of training examples."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch

__all__ = ["IGNORE_INDEX", "collate_for_training", "count_steps", "example_order", "micro_batches"]

IGNORE_INDEX = -100
"""Label of positions excluded from the loss (PyTorch cross-entropy's default ``ignore_index``)."""


def collate_for_training(
    features: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad features into a causal-LM training batch.

    Parameters
    ----------
    features : sequence of mappings
        Each holds ``input_ids`` and optionally ``labels`` (same length; defaults to a copy of
        ``input_ids``) and ``attention_mask`` (defaults to all ones).
    pad_token_id : int
        Id written into padded positions of ``input_ids``.

    Returns
    -------
    dict of str to Tensor
        ``input_ids`` and ``labels`` (int64) and ``attention_mask`` (int64), each of shape
        ``(batch, longest)``. Padded positions have mask 0 and label ``-100``. Right padding keeps
        the position ids of real tokens at ``0..len-1``, the same as in an unpadded batch, so a
        causal model gives the real tokens the same logits whatever they are batched with.

    Raises
    ------
    ValueError
        No features, an empty ``input_ids``, or ``labels`` / ``attention_mask`` of another length.
    """
    if len(features) == 0:
        raise ValueError("collate_for_training needs at least one feature")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the eos token)")
    longest = max(len(f["input_ids"]) for f in features)
    n = len(features)
    input_ids = torch.full((n, longest), int(pad_token_id), dtype=torch.long)
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, longest), dtype=torch.long)
    for i, f in enumerate(features):
        ids = list(f["input_ids"])
        if not ids:
            raise ValueError(f"feature {i} has an empty input_ids")
        lab = list(f.get("labels", ids))
        mask = list(f.get("attention_mask", [1] * len(ids)))
        if len(lab) != len(ids) or len(mask) != len(ids):
            raise ValueError(
                f"feature {i}: input_ids ({len(ids)}), labels ({len(lab)}) and attention_mask ({len(mask)}) "
                "must have the same length"
            )
        k = len(ids)
        input_ids[i, :k] = torch.tensor(ids, dtype=torch.long)
        labels[i, :k] = torch.tensor(lab, dtype=torch.long)
        attention[i, :k] = torch.tensor(mask, dtype=torch.long)
    # A position the feature itself masks out must not be trained on either.
    labels[attention == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def example_order(num_examples: int, total: int, *, seed: int) -> Iterator[int]:
    """Indices of ``total`` training examples drawn as consecutive seeded permutations.

    Each pass over the data is a fresh permutation of ``range(num_examples)`` from a local
    :class:`torch.Generator` seeded with ``seed``, so the order depends on nothing but
    ``(num_examples, seed)`` and the global RNG is neither used nor advanced. The stream stops
    after ``total`` indices (possibly mid-pass).
    """
    if num_examples < 1:
        raise ValueError("no training examples")
    gen = torch.Generator().manual_seed(int(seed))
    emitted = 0
    while emitted < total:
        for idx in torch.randperm(num_examples, generator=gen).tolist():
            if emitted >= total:
                return
            yield idx
            emitted += 1


def micro_batches(num_examples: int, total: int, micro_batch_size: int, *, seed: int) -> Iterator[list[int]]:
    """Group :func:`example_order` into micro-batches of ``micro_batch_size`` (the last may be smaller)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    batch: list[int] = []
    for idx in example_order(num_examples, total, seed=seed):
        batch.append(idx)
        if len(batch) == micro_batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def count_steps(total_examples: int, examples_per_step: int) -> int:
    """Optimizer steps needed for ``total_examples`` at ``examples_per_step`` (the last may be partial)."""
    return math.ceil(total_examples / examples_per_step)
