"""The bench tests. This conftest exists so that pytest puts ``tests/bench`` on ``sys.path`` and the
tests import ``bench_common``."""
