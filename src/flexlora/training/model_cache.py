"""flexlora's on-disk cache: its root directory and atomically built cache entries.

Converted models are stored as directories under the cache root (``$FLEXLORA_CACHE``
or the user cache directory). :func:`atomic_cached_dir` builds such an entry so that
readers see either no entry or a complete one, and :func:`is_complete_cache` decides
whether an existing entry can be trusted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flexlora._atomic import make_sibling_dir

__all__ = ["CACHE_ENV_VAR", "atomic_cached_dir", "default_cache_dir", "is_complete_cache"]

CACHE_ENV_VAR = "FLEXLORA_CACHE"

# Bumping this invalidates every cache directory written by an older layout.
_CACHE_FORMAT = 1
_MARKER_NAME = ".flexlora-complete.json"


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
