"""Starts embedded PostgreSQL and Redis (unless CORRAL_DATABASE_URL / CORRAL_REDIS_URL are set),
the five services as separate processes, publishes the example agent, and stops it all on Ctrl-C."""

from __future__ import annotations

import base64
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corral.client import CorralClient
from corral.config import ClientConfig
from services.common import embedded
from services.common.logs import setup_logging
from services.common.settings import Settings, inherited_environment

log = logging.getLogger("corral.launcher")
# Dependencies first: each service finds what it calls already up.
START_ORDER = ("telemetry", "registry", "sessions", "executor", "router")
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "progress-report"


class Launcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pg: embedded.EmbeddedPostgres | None = None
        self.redis: embedded.EmbeddedRedis | None = None
        self.stopping = False

    def _env(self) -> dict[str, str]:
        env = inherited_environment()
        env["CORRAL_DATA_DIR"] = str(self.settings.data_dir)
        # Ctrl-C reaches the whole process group; the services leave stopping to the launcher.
        env["CORRAL_SUPERVISED"] = "true"
        if self.pg is not None:
            env["CORRAL_DATABASE_URL"] = self.pg.url
        if self.redis is not None:
            env["CORRAL_REDIS_URL"] = self.redis.url
        for svc, addr in self.settings.addrs.items():
            env[f"CORRAL_{svc.upper()}_ADDR"] = addr
        if not self.settings.secrets_key:
            env["CORRAL_SECRETS_KEY"] = local_secret(self.settings.data_dir, "secrets.key", 32)
        if not self.settings.internal_token:
            env["CORRAL_INTERNAL_TOKEN"] = local_secret(self.settings.data_dir, "internal.token", 24)
        # One machine: tool services under development listen on localhost.
        env.setdefault("CORRAL_TOOLS_ALLOW_LOOPBACK", "true")
        return env

    def start_storage(self) -> None:
        data = self.settings.data_dir
        data.mkdir(parents=True, exist_ok=True)
        if self.settings.database_url:
            log.info("PostgreSQL: %s (from CORRAL_DATABASE_URL)", _redact(self.settings.database_url))
        else:
            t = time.monotonic()
            self.pg = embedded.start_postgres(data / "pg")
            log.info("PostgreSQL: embedded, data in %s (%.1fs)", data / "pg", time.monotonic() - t)
        if self.settings.redis_url:
            log.info("Redis: %s (from CORRAL_REDIS_URL)", _redact(self.settings.redis_url))
        else:
            self.redis = embedded.start_redis(data / "redis")
            log.info("Redis: embedded, socket %s", self.redis.socket)

    def check_ports(self) -> None:
        """Refuses to start beside another platform: its health checks would answer for ours."""
        busy = []
        wanted = dict(self.settings.listen)
        for svc, port in self.settings.metrics_ports.items():
            if port:
                wanted[f"{svc} /metrics"] = f"0.0.0.0:{port}"
        if self.settings.executor.http_port:
            wanted["executor http"] = f"0.0.0.0:{self.settings.executor.http_port}"
        for svc, listen in wanted.items():
            host, _, port = listen.rpartition(":")
            with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as s:
                try:
                    s.bind((host.strip("[]"), int(port)))
                except OSError:
                    busy.append(f"{svc} ({listen})")
        if busy:
            raise RuntimeError(
                f"already in use: {', '.join(busy)}. Is another Corral running? Stop it, or choose other "
                "addresses with CORRAL_<SERVICE>_ADDR"
            )

    def start_services(self) -> None:
        env = self._env()
        for svc in START_ORDER:
            # A child inherits an ignored SIGINT through exec, so Ctrl-C during its start-up does
            # not kill it half-way; the launcher stops it with SIGTERM in order instead.
            handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                self.procs[svc] = subprocess.Popen(
                    [sys.executable, "-m", f"services.{svc}"], env=env, cwd=ROOT, stdin=subprocess.DEVNULL
                )
            finally:
                signal.signal(signal.SIGINT, handler)
            self.wait_healthy(svc, timeout=60)

    def wait_healthy(self, svc: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        addr = self.settings.addrs[svc]
        with grpc.insecure_channel(addr) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.stopping:
                    raise RuntimeError("interrupted")
                proc = self.procs[svc]
                if proc.poll() is not None:
                    raise RuntimeError(f"{svc} exited with code {proc.returncode} while starting (see its log above)")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        log.info("%-9s serving on %s (pid %d)", svc, addr, proc.pid)
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{svc} did not become healthy on {addr} within {timeout:.0f}s")
                time.sleep(0.1)

    def publish_example(self) -> None:
        client = CorralClient(ClientConfig.from_env(self._env(), tenant="default", user="corral-launcher"))
        try:
            version = client.publish(EXAMPLE)
            log.info("example agent published: %s (%s)", version.name, version.digest[:19] + "…")
            existing = {e.name.rsplit("/", 1)[1] for e in client.endpoints("progress-report")}
            if "prod" not in existing:
                client.set_endpoint("progress-report", "prod", [(version.number, 100.0)])
                log.info("endpoint agents/progress-report/endpoints/prod → version %d (100%%)", version.number)
        finally:
            client.close()

    def stop(self) -> None:
        """Stops services in reverse start order, so each one's dependencies are still up while it
        drains (the executor releases leases and flushes spans before sessions and telemetry go)."""
        self.stopping = True
        for svc in reversed(START_ORDER):
            proc = self.procs.pop(svc, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in 15s; killing it", svc)
                proc.kill()
                proc.wait()
        if self.redis is not None:
            self.redis.stop()
        if self.pg is not None:
            self.pg.stop()
        log.info("stopped")

    def supervise(self) -> int:
        """Waits for Ctrl-C; if a service dies on its own, stops the rest."""
        while not self.stopping:
            for svc, proc in self.procs.items():
                if proc.poll() is not None:
                    log.error("%s exited unexpectedly (code %s); stopping the platform", svc, proc.returncode)
                    return 1
            time.sleep(0.5)
        return 0


def local_secret(data_dir: Path, name: str, size: int) -> str:
    """A random secret made once and kept beside the embedded databases (mode 0600), for what
    the environment does not set: the key that encrypts tool secrets at rest (they must survive
    a restart) and the registries' and executors' internal token."""
    path = data_dir / name
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(secrets.token_bytes(size)).decode())
        log.info("generated %s (set it in the environment to use your own)", path)
    return path.read_text().strip()


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}" if ":" in creds else url
    return url


def banner(settings: Settings) -> str:
    a = settings.addrs
    return f"""
Corral is running.
  router     {a['router']}   (invoke, chat)
  registry   {a['registry']}   (publish, endpoints, audit)
  sessions   {a['sessions']}
  executor   {a['executor']}
  telemetry  {a['telemetry']}   (OTLP traces in, traces and metrics out)
  Prometheus http://127.0.0.1:{settings.metrics_ports['telemetry']}/metrics (versions), :{settings.metrics_ports['registry']}/metrics (rollouts), :{settings.executor.http_port}/metrics (sandboxes)
  JWKS       http://127.0.0.1:{settings.executor.http_port}/.well-known/jwks.json (verifies invocation credentials)
  data       {settings.data_dir}

In another terminal (the corral command is in .venv/bin):
  source .venv/bin/activate
  corral invoke progress-report --endpoint prod --session demo --data '{{"text": "Client reports better sleep."}}'
  corral publish examples/progress-report-v2
  corral endpoint set progress-report prod --split 1=90,2=10
  corral chat progress-report --endpoint prod
  corral traces --agent progress-report --version 1
  corral metrics progress-report
Press Ctrl-C to stop everything.
"""


def main() -> int:
    settings = Settings.from_env()
    setup_logging("launcher", settings.log_level)
    launcher = Launcher(settings)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        launcher.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        launcher.check_ports()
        launcher.start_storage()
        launcher.start_services()
        launcher.publish_example()
        print(banner(settings), flush=True)
        code = launcher.supervise()
    except Exception as exc:  # noqa: BLE001 - one clear line, then a clean stop
        if not launcher.stopping:
            log.error("could not start the platform: %s", exc)
            code = 1
    finally:
        launcher.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
