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


def test_gvisor_without_runsc_refuses_to_start_saying_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.executor.drivers.bwrap import SandboxUnavailable

    monkeypatch.setattr(shutil, "which", lambda _name: None)
    hint = r"scripts/setup-sandbox\.sh.*apt-get install runsc"
    with pytest.raises(SandboxUnavailable, match=hint):
        drivers.driver_for("gvisor")


@pytest.mark.parametrize(("name", "says"), [("bwrap", "needs bubblewrap"), ("gvisor", "runsc")])
def test_a_driver_named_but_not_installed_refuses_to_start_instead_of_falling_back(
    name: str, says: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """CORRAL_SANDBOX_DRIVER=bwrap (what deploy/k8s sets) on a host without bubblewrap: the
    executor fails its start saying what to install, and never runs agents unisolated."""
    from services.executor.drivers.bwrap import SandboxUnavailable

    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(SandboxUnavailable, match=says):
        drivers.driver_for(name)
    assert "DOES NOT ISOLATE" not in caplog.text


def test_gvisor_is_never_the_default() -> None:
    assert "gvisor" in drivers.DRIVERS
    assert drivers.driver_for("").name != "gvisor"


@pytest.mark.skipif(shutil.which("runsc") is None,
                    reason="runsc is not installed (scripts/setup-sandbox.sh installs it)")
def test_gvisor_by_name_where_runsc_is_installed() -> None:
    assert drivers.driver_for("gvisor").name == "gvisor"


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_a_missing_runtime_refuses_to_start_rather_than_giving_up_isolation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bwrap is there, the agents' runtime is not: the default choice does not fall back to the
    process driver, it says to install the runtime."""
    from services.executor import runtime
    from services.executor.drivers.bwrap import RuntimeMissing

    monkeypatch.setattr(runtime, "installed", lambda: None)
    with pytest.raises(RuntimeMissing, match="run `make`"):
        drivers.driver_for("")
