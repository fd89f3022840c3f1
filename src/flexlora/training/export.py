"""Exporting a global adapter: as a standard PEFT adapter directory, or merged into the weights.

Both exports are written into a temporary directory next to the target and renamed into place
only when complete, so a crash never leaves a half-written export where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from flexlora._atomic import make_sibling_dir
from flexlora.core.types import Factors, lora_scaling
from flexlora.training.adapter import client_adapter, merged_weight

__all__ = ["atomic_directory_write", "check_replaceable", "save_merged_model", "save_peft_adapter"]


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


ADAPTER_MARKER = "adapter_config.json"
MERGED_MARKER = "config.json"


def check_replaceable(out_dir: str | os.PathLike[str], marker: str) -> Path:
    """``out_dir`` as an absolute path, when writing there can lose nothing: it does not exist, is
    empty, or holds an earlier output of the same kind (its ``marker`` file, e.g.
    ``adapter_config.json``), which is replaced whole.

    Raises
    ------
    FileExistsError
        ``out_dir`` is a file, or a non-empty directory without ``marker`` (another run's
        directory, or anything else a user keeps there).
    """
    target = Path(out_dir).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose a directory to write to")
    if target.is_dir() and any(target.iterdir()) and not (target / marker).is_file():
        raise FileExistsError(
            f"{target} is not empty and holds no earlier export ({marker}); writing there would replace "
            "everything in it. Choose a new or empty directory"
        )
    return target


def atomic_directory_write(out_dir: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp_dir)`` and move the finished directory to ``out_dir``.

    An existing ``out_dir`` is replaced only after ``write`` succeeded: it is renamed aside, the
    new directory renamed into place, and the old one deleted (POSIX cannot atomically swap two
    non-empty directories, so there is a moment without ``out_dir``, but never a partial one). If
    the second rename fails, the old directory is put back. On failure the temporary directory is
    removed and the exception propagates. Callers check first that the old directory may go
    (:func:`check_replaceable`).

    Returns
    -------
    Path
        ``out_dir``.
    """
    target = Path(out_dir).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    tmp = make_sibling_dir(target, "tmp")
    try:
        write(tmp)
        _fsync_tree(tmp)
        if target.exists():
            aside = make_sibling_dir(target, "old")
            os.replace(target, aside / "previous")
            try:
                os.rename(tmp, target)
            except BaseException:
                os.replace(aside / "previous", target)
                shutil.rmtree(aside, ignore_errors=True)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _ranks_of(factors: Mapping[str, Factors]) -> dict[str, int]:
    if not factors:
        raise ValueError("factors is empty: nothing to export")
    return {m: int(a.shape[0]) for m, (a, _) in factors.items()}


def save_peft_adapter(
    base_model: nn.Module,
    factors: Mapping[str, Factors],
    alpha: float,
    out_dir: str | os.PathLike[str],
    *,
    base_model_name_or_path: str,
    rslora: bool = False,
) -> Path:
    """Write ``factors`` as a standard PEFT LoRA adapter directory.

    The directory holds ``adapter_config.json`` (per-module ranks in ``rank_pattern``, with keys
    anchored to exact module names; ``lora_alpha = alpha``; ``use_rslora = rslora``) and
    ``adapter_model.safetensors``, written by peft's own ``save_pretrained``. Stock
    ``peft.PeftModel.from_pretrained(base, out_dir)`` on the same base model reproduces the
    effective update ``(alpha / r) B A`` (``(alpha / sqrt(r)) B A`` with ``rslora``) of every module.

    Parameters
    ----------
    base_model : nn.Module
        The base model (left unchanged; the adapter is attached and detached again).
    factors : mapping of module -> (A, B)
        ``A: (r, in)``, ``B: (out, r)``; ranks may differ per module.
    alpha : float
        LoRA alpha the factors were trained with.
    out_dir : path
        Target directory; replaced atomically if it exists.
    base_model_name_or_path : str
        Recorded in the config so the base can be found again (a model spec such as
        ``builtin:tiny-llama``, a directory or a hub id).
    rslora : bool, default False
        The factors are scaled by ``alpha / sqrt(r)`` (rsLoRA); recorded as ``use_rslora``.

    Returns
    -------
    Path
        The directory written.
    """
    ranks = _ranks_of(factors)

    def write(tmp: Path) -> None:
        with client_adapter(base_model, ranks, alpha, factors, rslora=rslora) as model:
            config = model.peft_config[model.active_adapter]
            config.base_model_name_or_path = base_model_name_or_path
            # Loaders then get a frozen adapter by default, as for any exported adapter.
            config.inference_mode = True
            # "auto" would look up the base on the Hugging Face Hub to decide about embeddings;
            # we never adapt embeddings, so say so and stay offline.
            model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        _check_saved_config(tmp, ranks, rslora)

    check_replaceable(out_dir, ADAPTER_MARKER)
    return atomic_directory_write(out_dir, write)


def _check_saved_config(directory: Path, ranks: Mapping[str, int], rslora: bool) -> None:
    from flexlora.training.adapter import rank_pattern_key

    cfg = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    saved = cfg.get("rank_pattern") or {}
    wrong = [m for m, r in ranks.items() if saved.get(rank_pattern_key(m)) != r]
    if wrong:
        raise RuntimeError(f"peft did not record the ranks of {wrong[:5]} in adapter_config.json")
    # Without the flag a loader would apply alpha / r to factors made for alpha / sqrt(r).
    if bool(cfg.get("use_rslora", False)) != rslora:
        raise RuntimeError(f"peft recorded use_rslora={cfg.get('use_rslora')!r} in adapter_config.json, "
                           f"expected {rslora}")


@torch.no_grad()
def merged_state_dict(
    base_model: nn.Module, factors: Mapping[str, Factors], alpha: float, *, rslora: bool = False
) -> dict[str, torch.Tensor]:
    """The base model's state dict with ``W + s B A`` in every adapted weight, ``s = alpha / r``
    (``alpha / sqrt(r)`` with ``rslora``).

    Adapted weights are new tensors (the product is formed in fp32, then cast to the weight's
    dtype); all others are the base's own tensors, so the base is never modified and only the
    adapted weights are copied.
    """
    state = dict(base_model.state_dict())
    for name, (a, b) in factors.items():
        key = f"{name}.weight"
        if key not in state:
            raise ValueError(f"module {name!r}: the base model has no weight {key!r}")
        w = state[key]
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ValueError(
                f"module {name!r}: factors A{tuple(a.shape)}, B{tuple(b.shape)} do not fit its weight "
                f"{tuple(w.shape)} (need A: (r, in), B: (out, r))"
            )
        state[key] = merged_weight(w, lora_scaling(alpha, r, rslora) * (b.to(w.device, torch.float32)
                                                                          @ a.to(w.device, torch.float32)))
    return state


def save_merged_model(
    base_model: nn.Module,
    tokenizer,
    factors: Mapping[str, Factors],
    alpha: float,
    out_dir: str | os.PathLike[str],
    *,
    rslora: bool = False,
) -> Path:
    """Save base + ``(alpha / r) B A`` (``(alpha / sqrt(r)) B A`` with ``rslora``) merged into the
    weights, as a plain Hugging Face model.

    The shared base model is not modified: the merged weights go into a separate state dict
    (:func:`merged_state_dict`) passed to ``save_pretrained``. The tokenizer is saved alongside
    (when given), so the directory loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``.

    Returns
    -------
    Path
        The directory written.
    """
    _ranks_of(factors)
    state = merged_state_dict(base_model, factors, alpha, rslora=rslora)

    def write(tmp: Path) -> None:
        base_model.save_pretrained(str(tmp), state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    check_replaceable(out_dir, MERGED_MARKER)
    return atomic_directory_write(out_dir, write)
