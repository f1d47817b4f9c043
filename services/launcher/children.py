"""What the launcher supervises (services/launcher/supervisor.py: Child): its service processes,
the embedded PostgreSQL and the embedded Redis, each restarted where it was."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.common import embedded
from services.launcher.output import file_tail
from services.launcher.restarts import describe_exit

if TYPE_CHECKING:
    from services.launcher.__main__ import Launcher


class ServiceChild:
    """One of the launcher's service processes, restarted on the address it had."""

    def __init__(self, launcher: Launcher, name: str) -> None:
        self.launcher = launcher
        self.name = name

    def exit_status(self) -> str | None:
        code = self.launcher.procs[self.name].poll()
        return None if code is None else describe_exit(code)

    def start(self) -> str:
        try:
            address = self.launcher.start_service(self.launcher.service_of[self.name], self.name)
        except Exception:
            embedded.stop_process(self.launcher.procs[self.name], grace_s=5)  # one that never became healthy
            raise
        return f"serving on {address} (pid {self.launcher.procs[self.name].pid})"

    def last_lines(self) -> list[str]:
        return self.launcher.outputs[self.name].last_lines()


class EmbeddedRedisChild:
    """The embedded Redis, restarted on the same socket (empty: it keeps nothing on disk)."""

    name = "redis"

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        assert launcher.redis is not None
        self.redis = launcher.redis

    def exit_status(self) -> str | None:
        code = self.redis.process.poll()
        return None if code is None else describe_exit(code)

    def start(self) -> str:
        self.redis = self.launcher.redis = embedded.start_redis(self.redis.socket.parent)
        return f"socket {self.redis.socket} (pid {self.redis.process.pid})"

    def last_lines(self) -> list[str]:
        return file_tail(self.redis.socket.parent / "redis.log")


class EmbeddedPostgresChild:
    """The embedded PostgreSQL, restarted on the same data directory and socket."""

    name = "postgres"

    def __init__(self, pg: embedded.EmbeddedPostgres) -> None:
        self.pg = pg

    def exit_status(self) -> str | None:
        # pg_ctl started it, so its exit code is not the launcher's to read.
        return None if self.pg.running() else "exit status unknown"

    def start(self) -> str:
        self.pg.restart()
        return f"data in {self.pg.pgdata} (pid {self.pg.pid})"

    def last_lines(self) -> list[str]:
        return file_tail(self.pg.pgdata / "log")
