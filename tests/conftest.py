"""Suite-wide settings: Hypothesis profiles, and the test seam's fault plans.

"default" (used by `make test` and CI) is derandomized: every run draws the same examples, so a
property test cannot pass on one run and fail on the next. "explore" draws fresh random examples
on every run, to look for new failures:

    .venv/bin/python -m pytest --hypothesis-profile=explore tests/core

Faults are injected only through flexlora's test seam (:mod:`flexlora.engines.faults`); the
plans live in tests/seam/faults_plan.py (importable as ``faults_plan``), and every test starts
and ends with no hook installed.
"""

import sys
from pathlib import Path

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).resolve().parent / "seam"))

settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("default")


@pytest.fixture(autouse=True)
def _no_fault_hooks():
    from flexlora.engines import faults

    faults.clear_hooks()
    yield
    faults.clear_hooks()
