"""testkit.tiny_model.isolated_env: what the service processes of tests and benchmarks inherit."""

from __future__ import annotations

import pytest

from testkit.env import isolated_env


def test_developer_settings_are_dropped_and_later_layers_win(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QUARK_MODEL", "/my/own/model")
    monkeypatch.setenv("QUARK_CACHE_DIR", "/shared/cache")
    monkeypatch.setenv("HOME_LIKE", "kept")
    env = isolated_env({"QUARK_PORT": "1", "QUARK_LOG_LEVEL": "info"}, {"QUARK_PORT": "2"})
    assert "QUARK_MODEL" not in env
    assert env["QUARK_CACHE_DIR"] == "/shared/cache" and env["HOME_LIKE"] == "kept"
    assert env["QUARK_PORT"] == "2" and env["QUARK_LOG_LEVEL"] == "info"
