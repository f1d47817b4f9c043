"""corral dev's pieces alone: what the watcher counts as a change, how it takes a burst of saves,
the syntax check, and the loop's decisions against a scripted platform (tests/fakes/cli.py).
tests/e2e/test_dev.py runs the whole command against a real platform."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from corral import names
from corral.dev.loop import (
    Build,
    Changed,
    DevEvent,
    DevFailure,
    DevLoop,
    Failed,
    Published,
    Routed,
    Unchanged,
    Watching,
)
from corral.dev.syntax import syntax_error
from corral.dev.watch import Snapshot, changes, scan
from tests.bundles import SAYS_HI, agent_files, write_bundle
from tests.fakes.cli import ScriptedDevPlatform

pytestmark = pytest.mark.timeout(10)


def test_the_watcher_ignores_caches_compiled_python_and_installed_dependencies(
    tmp_path: Path,
) -> None:
    root = write_bundle(tmp_path / "agent", {
        **agent_files("a", SAYS_HI), ".git/HEAD": "ref", "__pycache__/agent.cpython-311.pyc": "x",
        "lib/__pycache__/x.pyc": "x", "stray.pyc": "x", "deps/six.py": "x",
        "node_modules/m/index.js": "x", "corral_agent.egg-info/PKG-INFO": "x",
        # Only the top-level deps/ is publish's; a package's own deps/ is the agent's code.
        "lib/deps/vendored.py": "x",
    })
    assert sorted(scan(root)) == ["agent.py", "agent.toml", "lib/deps/vendored.py", "prompt.md"]


async def test_a_burst_of_saves_is_one_change_once_the_directory_is_quiet(
    tmp_path: Path,
) -> None:
    root = write_bundle(tmp_path / "agent", agent_files("a", SAYS_HI))
    # What happens in the directory during each poll's wait, in turn.
    during: list[Callable[[], object]] = [
        lambda: None,
        lambda: (root / "agent.py").write_text(SAYS_HI + "# edited\n"),
        lambda: (root / "prompt.md").write_text("You help more.\n"),
        lambda: None,  # quiet: the change is reported
        lambda: (root / "notes.md").write_text("new"),
        lambda: None,
    ]

    async def sleep(_seconds: float) -> None:
        during.pop(0)()

    watched = changes(root, scan(root), sleep=sleep)
    assert await anext(watched) == ("agent.py", "prompt.md")
    assert await anext(watched) == ("notes.md",)
    await watched.aclose()


def test_a_file_that_does_not_compile_is_named_with_its_line(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "agent", {
        **agent_files("a", SAYS_HI), "tools/helper.py": "def f(:\n    pass\n"})
    assert syntax_error(root, scan(root)) == "tools/helper.py:1: invalid syntax"
    (root / "tools" / "helper.py").write_text("def f():\n    pass\n")
    assert syntax_error(root, scan(root)) is None


# -- the loop ---------------------------------------------------------------------------------


def built(digest: str, agent: str = "a") -> Build:
    return Build(b"tar of " + digest.encode(), digest, agent)


def v(number: int, agent: str = "a") -> names.VersionRef:
    return names.VersionRef(agent, number)


def scripted_changes(count: int) -> Callable[[Path, Snapshot], AsyncIterator[tuple[str, ...]]]:
    """A watcher that reports `count` changes to agent.py, then ends (and with it the loop).
    Like a real one it waits between changes, which lets the tail of each version start."""

    async def watch(_root: Path, _since: Snapshot) -> AsyncIterator[tuple[str, ...]]:
        for _ in range(count):
            await asyncio.sleep(0)
            yield ("agent.py",)
        await asyncio.sleep(0)

    return watch


async def run_loop(
    tmp_path: Path, platform: ScriptedDevPlatform, *, agent: str | None = None,
    tail: Callable[[names.VersionRef], object] | None = None,
) -> list[DevEvent]:
    events: list[DevEvent] = []

    async def tail_with(version: names.VersionRef) -> None:
        if tail is not None:
            tail(version)
        await asyncio.Event().wait()  # until replaced

    loop = DevLoop(tmp_path, "dev", platform, events.append, agent=agent, tail=tail_with,
                   watch=scripted_changes(len(platform.builds) - 1))
    await loop.run()
    return events


async def test_each_new_digest_is_published_and_routed_and_the_same_bytes_publish_nothing(
    tmp_path: Path,
) -> None:
    platform = ScriptedDevPlatform(built("d1"), built("d1"), built("d2"), built("d1"))
    events = await run_loop(tmp_path, platform)
    dev = names.EndpointRef("a", "dev")
    assert events == [
        Watching(tmp_path, "dev"),
        Published(v(1), "d1"), Routed(dev, v(1)),
        Changed(("agent.py",)), Unchanged(v(1)),
        Changed(("agent.py",)), Published(v(2), "d2"), Routed(dev, v(2)),
        # Back to the first bytes: the registry answers with version 1, and dev goes back to it.
        Changed(("agent.py",)), Published(v(1), "d1"), Routed(dev, v(1)),
    ]
    assert platform.uploads == 3


async def test_a_failed_build_or_call_leaves_the_endpoint_on_the_last_good_version(
    tmp_path: Path,
) -> None:
    platform = ScriptedDevPlatform(
        DevFailure("agent.toml: (file): not valid TOML"), built("d1"),
        DevFailure("agent.py:3: invalid syntax"), built("d2"))
    events = await run_loop(tmp_path, platform)
    failures = [e for e in events if isinstance(e, Failed)]
    assert failures == [Failed("agent.toml: (file): not valid TOML", None),
                        Failed("agent.py:3: invalid syntax", v(1))]
    assert [version for _, version in platform.routes] == [v(1), v(2)]


async def test_an_agent_toml_that_renames_the_agent_is_refused(tmp_path: Path) -> None:
    platform = ScriptedDevPlatform(built("d1", agent="b"), built("d2", agent="a"))
    events = await run_loop(tmp_path, platform, agent="a")
    assert isinstance(events[1], Failed) and "is 'b', but this dev loop publishes 'a'" in events[1].message
    assert platform.published == ["d2"]


async def test_the_tail_follows_the_served_version(tmp_path: Path) -> None:
    tailed: list[names.VersionRef] = []
    platform = ScriptedDevPlatform(built("d1"), built("d1"), DevFailure("broken"), built("d2"))
    await run_loop(tmp_path, platform, tail=tailed.append)
    assert tailed == [v(1), v(2)]

