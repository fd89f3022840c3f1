"""Hypothesis profiles for the whole suite.

"default" (used by `make test` and CI) is derandomized: every run draws the same examples, so a
property test cannot pass on one run and fail on the next. "explore" draws fresh random examples
on every run, to look for new failures:

    .venv/bin/python -m pytest --hypothesis-profile=explore tests/core
"""

from hypothesis import settings

settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("default")
