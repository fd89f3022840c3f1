"""The engine tests. This conftest exists so that pytest puts ``tests/engines`` on ``sys.path``
and every engine test, the Flower ones included, imports ``engine_common``."""
