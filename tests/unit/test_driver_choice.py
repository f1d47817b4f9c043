"""Which sandbox driver the executor gets."""

from __future__ import annotations

import shutil

import pytest

from services.executor import drivers


def test_an_unknown_driver_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown sandbox driver 'firecracker'"):
        drivers.driver_for("firecracker")


def test_the_process_driver_warns_that_it_does_not_isolate(caplog: pytest.LogCaptureFixture) -> None:
    assert drivers.driver_for("process").name == "process"
    assert "DOES NOT ISOLATE" in caplog.text


def test_without_bubblewrap_the_default_falls_back_loudly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    assert drivers.driver_for("").name == "process"
    assert "DOES NOT ISOLATE" in caplog.text


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_bwrap_is_the_default_where_installed() -> None:
    assert drivers.driver_for("").name == "bwrap"
