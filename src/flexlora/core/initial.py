"""The one fresh LoRA adapter that every client of a round starts from.

A federation starts from the server's global model: in round 1 every client must begin from the
same initial adapter, or the factor-averaging aggregators (FedAvg, FedIT, HetLoRA) average
independent random ``A`` matrices. The average of ``K`` independent draws has about
``1/sqrt(K)`` of one draw's norm, and each client's learned ``B_k`` gets multiplied with the
other clients' ``A``: the global update is not the clients' training. Aggregators of products
(FlexLoRA, FLoRA) are exact either way, but share the same start for a like-for-like comparison.

The initial adapter is not sent: it is a function of a seed that the server hands out with the
task, so round 1 still sends no factors down. It matches PEFT's default initialisation in law
(``A`` kaiming-uniform with ``a = sqrt(5)``, which is uniform on ``[-1/sqrt(in), 1/sqrt(in)]``,
and ``B = 0``). ``A`` is drawn row by row from one generator per module, so a client of rank
``r`` gets the first ``r`` rows of what a client of a larger rank gets: clients of different ranks
start from nested adapters, as they would by truncating one global initial adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from flexlora.core.lowrank import stable_seed
from flexlora.core.types import Factors

__all__ = ["fresh_factors", "initial_A"]


def initial_A(shape: tuple[int, int], rank: int, seed: int, module: str) -> torch.Tensor:
    """Rows ``0 .. rank-1`` of module ``module``'s initial ``A`` for the initialisation seed ``seed``.

    Parameters
    ----------
    shape : (out_features, in_features)
        The module's weight shape.
    rank : int
        How many rows to draw (the client's rank of that module).
    seed : int
        The round's initialisation seed (the same for every client of the round).
    module : str
        The module's name; each module draws from its own generator.

    Returns
    -------
    torch.Tensor
        ``(rank, in_features)`` float32, uniform on ``[-1/sqrt(in), 1/sqrt(in)]``.
    """
    out_f, in_f = shape
    if rank < 1 or rank > min(out_f, in_f):
        raise ValueError(f"module {module!r}: rank {rank} must be in [1, min(out, in) = {min(out_f, in_f)}]")
    bound = 1.0 / math.sqrt(in_f)
    g = torch.Generator(device="cpu").manual_seed(stable_seed("lora-init", seed, module))
    # One contiguous draw fills row-major from one stream, so any rank's draw is a prefix of a
    # larger rank's (a test pins this property of torch's CPU generator).
    return torch.empty(rank, in_f, dtype=torch.float32).uniform_(-bound, bound, generator=g)


def fresh_factors(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], seed: int) -> dict[str, Factors]:
    """The round's shared fresh adapter at one client's ranks: ``{module: (A, B)}`` with ``B = 0``.

    Parameters
    ----------
    shapes : mapping module -> (out_features, in_features)
    ranks : mapping module -> int
        The client's rank of each module; must name exactly the modules of ``shapes`` it uses.
    seed : int
        The round's initialisation seed.

    Returns
    -------
    dict
        ``{module: (A (r, in), B (out, r))}`` in float32; the effective update ``B A`` is zero.
    """
    missing = sorted(set(ranks) - set(shapes))
    if missing:
        raise ValueError(f"no weight shape for modules {missing[:3]}")
    return {m: (initial_A(shapes[m], r, seed, m), torch.zeros(shapes[m][0], r, dtype=torch.float32))
            for m, r in ranks.items()}
