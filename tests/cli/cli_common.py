"""Helpers shared by the CLI tests."""

from __future__ import annotations

from pathlib import Path


def as_sets(items: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` as command-line arguments ``--set a=1 --set b=2``."""
    return [x for s in items for x in ("--set", s)]


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` with its bytes (to show that a command left a directory as it was)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
