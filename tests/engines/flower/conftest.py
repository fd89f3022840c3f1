"""Shared settings of the Flower engine tests: a tiny run, and Flower kept offline and quiet."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="the Flower extra is not installed (pip install -e '.[flower]')")



@pytest.fixture(autouse=True)
def _flower_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr_home")))
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
