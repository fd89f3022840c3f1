"""What the server and a Flower node both build from a run's config: the device, the model, the
data and its partition, the client types, the local training and encoding settings.

Nothing here is the server's: a node imports this module, never the orchestration.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flexlora.core.distributions import PAPER_CLIENT_TYPES, ClientType
from flexlora.data import JSONL_FIELD_DEFAULTS, Example, TaskData, load_eval_data, load_task_data, partition_examples
from flexlora.engines.config import ConfigError, RunConfig
from flexlora.training.client import EncodingOptions
from flexlora.training.local import LocalTrainConfig
from flexlora.training.models import load_base_model


def resolve_device(name: str) -> torch.device:
    """``"auto"`` picks CUDA, then MPS, then CPU.

    Raises
    ------
    ConfigError
        For a device this machine does not have (on Flower, a node whose hardware differs from
        the server's: ``device = "auto"`` lets each process pick its own).
    """
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps:
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"config key 'device': {name!r} is not a torch device ({exc}); use 'auto', 'cpu', "
                          "'cuda', 'cuda:N' or 'mps'") from exc
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ConfigError(f"config key 'device': {name!r}, but this machine has {found}; use device='auto' "
                          "(each process, each Flower node too, then picks what it has) or 'cpu'")
    if device.type == "mps" and not mps:
        raise ConfigError(f"config key 'device': {name!r}, but MPS is not available here; use device='auto' or 'cpu'")
    return device


def base_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def client_types_for(cfg: RunConfig) -> list[ClientType]:
    """The resource types of a run, smallest first, with the run's alpha."""
    if cfg.lora.types:
        return [ClientType(f"type{i + 1}", a, m, cfg.lora.alpha) for i, (a, m) in enumerate(cfg.lora.types)]
    return [ClientType(t.name, t.attention_rank, t.mlp_rank, cfg.lora.alpha) for t in PAPER_CLIENT_TYPES]


def local_train_config(cfg: RunConfig) -> LocalTrainConfig:
    """The local training settings of every client of a run."""
    t = cfg.train
    return LocalTrainConfig(
        optimizer=t.optimizer, lr=t.lr, weight_decay=t.weight_decay, momentum=t.momentum,
        micro_batch_size=t.micro_batch_size, grad_accum_steps=t.grad_accum_steps, local_steps=cfg.local_steps,
        epochs=t.epochs, max_grad_norm=t.max_grad_norm, lr_scheduler=t.lr_scheduler, warmup_steps=t.warmup_steps,
    )


def encoding_options(cfg: RunConfig) -> EncodingOptions:
    return EncodingOptions(cfg.train.template, cfg.train.cutoff_len, cfg.train.train_on_inputs)


def _field_options(section: Any) -> dict[str, str | None]:
    """The generic loader's field names set in a config section (``data_options`` or ``eval``).

    Only the ones that differ from the loader's defaults are passed on, since any field-name
    option makes the loader read a JSON file generically and rejects non-JSON sources; ``""``
    is the config's way to say "no such field" (``None``).
    """
    return {k: getattr(section, k) or None for k, default in JSONL_FIELD_DEFAULTS.items()
            if getattr(section, k) != default}


def load_run_data(cfg: RunConfig) -> TaskData:
    """The run's data set through the project's loaders, with the config's data options."""
    options: dict[str, Any] = _field_options(cfg.data_options)
    if cfg.data_options.max_per_task:
        options["max_per_task"] = cfg.data_options.max_per_task
    if cfg.data_options.unseen_tasks:
        options["unseen_tasks"] = list(cfg.data_options.unseen_tasks)
    return load_task_data(cfg.data, spec_key="data", option_prefix="data_options.", **options)


def load_run_eval_data(cfg: RunConfig) -> TaskData | None:
    """The separate evaluation set of ``eval.data`` (its tasks are ``unseen``), or ``None`` when unset.

    Raises
    ------
    DataError
        A missing or malformed ``eval.data``, or a record without a required field (the fix
        names the ``--set eval.*`` key to use).
    """
    e = cfg.eval
    if not e.data:
        return None
    return load_eval_data(e.data, max_per_task=e.max_examples_per_task or None, spec_key="eval.data",
                          option_prefix="eval.", **_field_options(e))


def round_size(num_clients: int, clients_per_round: float) -> int:
    """How many clients a round samples: a fraction below 1 (at least one), a count from 1 up,
    at most ``num_clients``."""
    m = max(1, round(clients_per_round * num_clients)) if clients_per_round < 1 else int(clients_per_round)
    return min(m, num_clients)


def sample_round_clients(num_clients: int, clients_per_round: float, seed: int, rnd: int) -> list[int]:
    """The clients of round ``rnd``: a seeded draw without replacement, sorted.

    ``clients_per_round`` below 1 is a fraction (at least one client); from 1 up it is a count.
    The draw depends only on ``(seed, rnd)``, so a resumed run samples the same clients.
    """
    m = round_size(num_clients, clients_per_round)
    rng = np.random.default_rng([seed, rnd, 0x5A17])
    return sorted(int(i) for i in rng.choice(num_clients, size=m, replace=False))


def load_run_model(cfg: RunConfig) -> tuple[torch.nn.Module, Any, torch.device]:
    """The run's base model on its device, frozen and in eval mode, with its tokenizer."""
    device = resolve_device(cfg.device)
    model, tokenizer = load_base_model(cfg.model, dtype=base_dtype(cfg.dtype))
    model.to(device)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer, device


def partition_of(cfg: RunConfig, data: TaskData) -> Any:
    """The run's deterministic partition of ``data`` into its clients (the same on every node)."""
    n = cfg.num_clients or len(data.train)
    return partition_examples(data, n, cfg.data_options.partition, alpha=cfg.data_options.dirichlet_alpha,
                              seed=cfg.seed)


def examples_by_id(data: TaskData) -> dict[str, Example]:
    """Every training example of ``data`` by its id."""
    return {ex.id: ex for exs in data.train.values() for ex in exs}
