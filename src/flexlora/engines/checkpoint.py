"""Atomic run checkpoints: everything needed to resume a run exactly.

A checkpoint is one ``torch.save`` file holding plain values and tensors only (it is loaded with
``weights_only=True``, so a checkpoint cannot run code). It is written to a temporary file in the
same directory, flushed to disk, and renamed over the previous one, so a crash at any moment
leaves either the old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from flexlora._atomic import atomic_open, atomic_write_text

__all__ = ["CheckpointError", "atomic_open", "atomic_write_text", "config_fingerprint", "load_checkpoint",
           "save_checkpoint"]

FORMAT_VERSION = 1
LATEST = "latest.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupted, or belongs to a different run configuration."""


def config_fingerprint(config: dict[str, Any], *, ignore: tuple[str, ...] = ("rounds",)) -> str:
    """sha256 of the canonical JSON of ``config`` without the keys in ``ignore``.

    ``rounds`` is ignored so that a finished run can be resumed with more rounds.
    """
    clean = {k: v for k, v in config.items() if k not in ignore}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(ckpt_dir: Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` as ``ckpt_dir/latest.pt`` and return its path."""
    path = Path(ckpt_dir) / LATEST
    with atomic_open(path) as f:
        torch.save({"format_version": FORMAT_VERSION, **payload}, f)
    return path


def load_checkpoint(ckpt_dir: Path) -> dict[str, Any]:
    """Read ``ckpt_dir/latest.pt``.

    Raises
    ------
    CheckpointError
        When it is missing, unreadable (truncated or corrupted), or of an unknown format.
    """
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; the run has not finished a round yet (start it again without --resume)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupted archives
        raise CheckpointError(
            f"checkpoint {path} is corrupted or truncated ({type(exc).__name__}: {exc}); "
            "delete it to restart the run from scratch"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has an unknown format (expected version {FORMAT_VERSION})")
    return payload
