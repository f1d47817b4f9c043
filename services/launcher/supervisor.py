"""Keeps the launcher's processes running: notices one that died, says so, and starts it again
(on the same address, port or data directory) after the back-off of `restarts.py`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from services.launcher.restarts import RestartHistory, RestartPolicy, after_exit

log = logging.getLogger("corral.launcher")


class Interrupted(Exception):
    """The launcher is stopping (Ctrl-C or SIGTERM): nothing is to be started any more."""


class Child(Protocol):
    """A process the launcher started and keeps running."""

    @property
    def name(self) -> str: ...

    def exit_status(self) -> str | None:
        """How the process ended ("exit code 1", "killed by SIGKILL"), or None while it runs."""

    def start(self) -> str:
        """Starts the process again and waits until it serves; says where. Raises when it does
        not come up, Interrupted when the launcher stops meanwhile."""

    def last_lines(self) -> list[str]:
        """The end of its log, for a crash report."""


@dataclass
class _Watch:
    child: Child
    started_at: float
    history: RestartHistory = field(default_factory=RestartHistory)
    # When to start it again, once it has died.
    due: float | None = None


class Supervisor:
    def __init__(self, children: Iterable[Child], started_at: Mapping[str, float], policy: RestartPolicy | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`started_at`: when each child (by name) was started, on `clock`."""
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self._watches = [_Watch(child, started_at[child.name]) for child in children]

    def check(self) -> None:
        """One look at every child, in order (storage before the services that use it): reports
        those that died, restarts those whose back-off is over."""
        for watch in self._watches:
            if watch.due is None:
                if (status := watch.child.exit_status()) is not None:
                    self._died(watch, f"exited ({status}) after {self.clock() - watch.started_at:.1f}s")
            elif self.clock() >= watch.due:
                self._restart(watch)

    def _died(self, watch: _Watch, what: str) -> None:
        now = self.clock()
        restart, watch.history = after_exit(self.policy, watch.history, started_at=watch.started_at, exited_at=now)
        watch.due = now + restart.delay_s
        name = watch.child.name
        if not restart.crash_loop:
            log.warning("%s %s; restarting it in %.1fs", name, what, restart.delay_s)
            return
        lines = "".join(f"\n  | {line}" for line in watch.child.last_lines()) or "\n  | (no output)"
        log.error(
            "%s is crash-looping: %d exits in %.0fs, the last one: %s; restarting it every %.0fs until it "
            "stays up (Ctrl-C stops everything). Its last lines:%s",
            name, restart.recent_exits, self.policy.crash_loop_window_s, what, restart.delay_s, lines)

    def _restart(self, watch: _Watch) -> None:
        watch.started_at = self.clock()
        try:
            where = watch.child.start()
        except Interrupted:
            raise
        except Exception as exc:  # noqa: BLE001 - it did not come back: another exit, another back-off
            watch.due = None
            self._died(watch, f"did not restart ({exc})")
            return
        watch.due = None
        log.warning("%s restarted: %s", watch.child.name, where)
