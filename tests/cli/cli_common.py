"""Helpers shared by the CLI tests."""

from __future__ import annotations

from pathlib import Path

from flexlora.cli.main import main

TINY_BASE = [
    "model=builtin:tiny-llama", "num_clients=3", "clients_per_round=2", "local_steps=2",
    "data_options.max_per_task=4", "train.micro_batch_size=2", "train.cutoff_len=96",
    "eval.max_examples_per_task=2", "eval.max_new_tokens=3", "eval.per_type=false",
    "lora.types=[[2, 4], [4, 8]]",
]
"""The tiny run both CLI test files start from; each adds its own ``rounds`` and ``eval.max_tasks``."""


def as_sets(items: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` as command-line arguments ``--set a=1 --set b=2``."""
    return [x for s in items for x in ("--set", s)]


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under ``d`` with its bytes (to show that a command left a directory as it was)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def finished_run(tmp_path_factory, name: str, items: list[str]) -> Path:
    """A run of ``items`` finished through ``flexlora run`` in a fresh temporary directory."""
    d = tmp_path_factory.mktemp(name) / "run"
    assert main(["run", *as_sets(items), "--output", str(d), "--no-progress"]) == 0
    return d
