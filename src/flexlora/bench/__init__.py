"""Benchmarks built on the engines: ``flexlora bench quality`` (the paper's comparison as one
resumable grid of runs).

Layering: this package imports :mod:`flexlora.engines` (and below); the CLI imports it, never the
other way round.

- :mod:`flexlora.bench.grid`: the rows of a grid and the presets (smoke, quick, paper);
- :mod:`flexlora.bench.quality`: runs a grid into a directory, skipping finished rows and resuming
  interrupted ones, and collects ``results.jsonl``;
- :mod:`flexlora.bench.report`: ``results.md`` and the PNG plots from ``results.jsonl``.
"""

from flexlora.bench.grid import (
    DATASETS,
    PRESETS,
    BenchError,
    DatasetSpec,
    Preset,
    Row,
    get_preset,
    grid_rows,
)
from flexlora.bench.quality import Plan, QualityResult, plan_quality, run_quality
from flexlora.bench.report import render_markdown, write_report

__all__ = [
    "DATASETS",
    "PRESETS",
    "BenchError",
    "DatasetSpec",
    "Plan",
    "Preset",
    "QualityResult",
    "Row",
    "grid_rows",
    "plan_quality",
    "render_markdown",
    "get_preset",
    "run_quality",
    "write_report",
]
