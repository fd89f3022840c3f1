"""GGUF checkpoints: dequantizing them to fp32 safetensors and caching the result.

A ``.gguf`` model spec is converted once into a Hugging Face directory under
``<cache_root>/models/``, keyed by the file's path, size and mtime, and loaded from
there afterwards.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexlora.training.hf_loading import _ensure_chat_template, _load_hf_dir
from flexlora.training.model_cache import atomic_cached_dir


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint to fp32 and save it as a Hugging Face directory."""
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # The weights are already dequantized; leaving the GGUF quantizer attached would make
    # save_pretrained and later loads treat the safetensors as quantized.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    _ensure_chat_template(tok)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def _gguf_cache_entry(gguf_path: Path, cache_root: Path) -> tuple[Path, dict[str, Any]]:
    st = gguf_path.stat()
    fingerprint = {"source": str(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^\w.-]+", "_", gguf_path.stem)[:64]
    return cache_root / "models" / f"gguf-{stem}-{digest}", fingerprint


def _load_gguf(gguf_path: Path, dtype: torch.dtype, cache_root: Path) -> tuple[Any, Any]:
    target, fingerprint = _gguf_cache_entry(gguf_path, cache_root)
    atomic_cached_dir(target, lambda out: _convert_gguf(gguf_path, out), fingerprint=fingerprint)
    return _load_hf_dir(target, dtype)
