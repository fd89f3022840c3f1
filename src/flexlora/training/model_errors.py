"""Exceptions raised while parsing model specs and loading base models."""

from __future__ import annotations

__all__ = ["ModelLoadError", "ModelSpecError"]


class ModelLoadError(OSError):
    """A model spec could not be turned into a model (offline, download failed, unreadable files, ...).

    Subclasses :class:`OSError` because that is what ``from_pretrained`` raises for the
    same situations, so existing ``except OSError`` handlers keep working.
    """


class ModelSpecError(ValueError):
    """A model spec that names no model: an unknown builtin, a directory without config.json,
    a file that is not .gguf, or text that is neither a path nor a hub id."""
