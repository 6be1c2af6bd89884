"""``reft_kernels._environ.EnvSwitch``: the environment switches' fast read follows every change
made through ``os.environ`` (set, changed, cleared), and its fallback reads the same."""
from __future__ import annotations

import os

import pytest

from reft_kernels import _environ, cpu_ext
from reft_kernels._backend import env_backend

NAME = "REFT_KERNELS_TEST_SWITCH"


@pytest.mark.parametrize("fast", [True, False], ids=["table", "fallback"])
def test_switch_follows_the_environment(monkeypatch, fast):
    if fast and not _environ._FAST:
        pytest.skip("this Python has no os.environ._data")
    monkeypatch.setattr(_environ, "_FAST", fast)
    seen = []
    switch = _environ.EnvSwitch(NAME, lambda v: seen.append(v) or v.upper())
    monkeypatch.delenv(NAME, raising=False)
    assert switch() == "" and switch() == ""
    for value in ("on", "on", "off", ""):
        monkeypatch.setenv(NAME, value)
        assert switch() == value.upper()
    os.environ[NAME] = "x y"
    assert switch() == "X Y"
    del os.environ[NAME]
    assert switch() == ""
    # parsed once at creation, then once per change: not at every read
    assert seen == ["", "on", "off", "", "x y", ""]


def test_the_package_switches_read_at_every_call(monkeypatch):
    monkeypatch.delenv(cpu_ext.ENV_VAR, raising=False)
    monkeypatch.delenv("REFT_KERNELS_BACKEND", raising=False)
    assert cpu_ext.enabled() and env_backend() is None
    for off in ("0", " False ", "NO", "off"):
        monkeypatch.setenv(cpu_ext.ENV_VAR, off)
        assert not cpu_ext.enabled(), off
    monkeypatch.setenv(cpu_ext.ENV_VAR, "1")
    assert cpu_ext.enabled()
    monkeypatch.setenv("REFT_KERNELS_BACKEND", " Torch ")
    assert env_backend() == "torch"
    monkeypatch.setenv("REFT_KERNELS_BACKEND", "")
    assert env_backend() is None
