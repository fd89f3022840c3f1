"""SLoRA's stage 1 on the client: train a sparse change of each adapted weight on its mask.

The change is a leaf vector per module (only the masked entries exist, so only they carry
gradients and AdamW state); the forward pass sees ``W + scatter(values)`` through a
``torch.nn.utils.parametrize`` parametrization that is removed afterwards, leaving the shared
base model's weights bit-identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils import parametrize

from flexlora.core.sparse import SparseUpdate, dense_change, mask_prefix
from flexlora.data.examples import Example
from flexlora.training.adapter import merged_weight
from flexlora.training.local import LocalTrainConfig, LocalTrainResult, train_local


@dataclass
class SparseTask:
    """What a stage-1 client needs: its mask size per module, the mask seed, and the global change.

    Attributes
    ----------
    counts : mapping module -> int
        The client's mask size (a prefix of the module's seeded permutation).
    seed : int
        The mask seed of the run.
    global_change : mapping module -> 1-D Tensor, or None
        The change accumulated by the previous stage-1 rounds (on the run's largest prefix);
        None in round 1.
    """

    counts: Mapping[str, int]
    seed: int
    global_change: Mapping[str, torch.Tensor] | None = None


class _AddScattered(torch.nn.Module):
    def __init__(self, idx: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.idx = idx
        self.values = values

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        flat = torch.zeros(w.numel(), dtype=self.values.dtype, device=w.device)
        flat = flat.index_put((self.idx,), self.values)
        return w + flat.view_as(w).to(w.dtype)


@contextlib.contextmanager
def merged_sparse_change(model: torch.nn.Module, change: Mapping[str, torch.Tensor] | None,
                         shapes: Mapping[str, tuple[int, int]], seed: int) -> Iterator[None]:
    """Add the dense form of a stage-1 change to the weights for the block, then restore them bit for bit."""
    modules = dict(model.named_modules())
    saved: dict[str, torch.Tensor] = {}
    try:
        if change is not None:
            with torch.no_grad():
                for m, shape in shapes.items():
                    w = modules[m].weight
                    saved[m] = w.detach().clone()
                    w.copy_(merged_weight(w, dense_change(m, shape, change[m], seed)))
        yield
    finally:
        with torch.no_grad():
            for m, w0 in saved.items():
                modules[m].weight.copy_(w0)


@contextlib.contextmanager
def sparse_changes(model: torch.nn.Module, task: SparseTask, shapes: Mapping[str, tuple[int, int]]
                   ) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every module's forward uses ``W0 + global change + values`` where
    ``values`` (yielded, zero-initialised, requiring grad) sit on the client's mask prefix."""
    modules = dict(model.named_modules())
    values: dict[str, torch.Tensor] = {}
    with merged_sparse_change(model, task.global_change, shapes, task.seed), contextlib.ExitStack() as stack:
        stack.callback(_unparametrize, modules, values)
        for m, shape in shapes.items():
            w = modules[m].weight
            idx = mask_prefix(m, shape, int(task.counts[m]), task.seed).to(w.device)
            values[m] = torch.zeros(idx.shape[0], dtype=torch.float32, device=w.device, requires_grad=True)
            parametrize.register_parametrization(modules[m], "weight", _AddScattered(idx, values[m]), unsafe=True)
        yield values


def _unparametrize(modules: Mapping[str, torch.nn.Module], values: Mapping[str, torch.Tensor]) -> None:
    for m in values:
        if parametrize.is_parametrized(modules[m], "weight"):
            parametrize.remove_parametrizations(modules[m], "weight", leave_parametrized=False)


def train_sparse_client(base_model: torch.nn.Module, features: Sequence[Mapping[str, Sequence[int]]],
                        examples: Sequence[Example], task: SparseTask, shapes: Mapping[str, tuple[int, int]],
                        train_cfg: LocalTrainConfig, *, seed: int, client_id: str | None = None
                        ) -> tuple[SparseUpdate, LocalTrainResult]:
    """Train one client's stage-1 sparse change and return it (the base model is unchanged on return)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with sparse_changes(base_model, task, shapes) as values:
            result = train_local(base_model, features, train_cfg, seed=seed, params=list(values.values()))
            out = {m: v.detach().cpu().clone() for m, v in values.items()}
    update = SparseUpdate(values=out, num_examples=len(examples), client_id=client_id,
                          metadata={"train_loss": result.mean_loss, "steps": result.steps})
    return update, result
