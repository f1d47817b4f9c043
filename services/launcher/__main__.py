"""Starts embedded PostgreSQL and Redis (unless CORRAL_DATABASE_URL / CORRAL_REDIS_URL are set),
the five services as separate processes, publishes the example agent, restarts whatever of these
dies, and stops it all on Ctrl-C."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import TypeAlias, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from corral.client import CorralClient
from corral.config import ClientConfig
from services.common import addresses, embedded
from services.common.auth.pki import LOCAL_HOSTS, ensure_pki
from services.common.logs import setup_logging
from services.common.settings import SERVICES, START_ORDER, Settings, inherited_environment
from services.launcher import replicas
from services.launcher.children import EmbeddedPostgresChild, EmbeddedRedisChild, ServiceChild
from services.launcher.output import OutputTail
from services.launcher.ports import HeldPort
from services.launcher.restarts import describe_exit
from services.launcher.supervisor import Child, Interrupted, Supervisor

log = logging.getLogger("corral.launcher")
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "progress-report"
# The HTTP ports, which take "any" for a port the OS picks (0 turns one off, as documented).
HTTP_PORTS = (
    "CORRAL_TELEMETRY_METRICS_PORT", "CORRAL_REGISTRY_METRICS_PORT", "CORRAL_ROUTER_METRICS_PORT",
    "CORRAL_SESSIONS_METRICS_PORT", "CORRAL_EXECUTOR_HTTP_PORT", "CORRAL_OTLP_HTTP_PORT",
)
ANY_PORT = "any"
# Secrets in the environment, and the one service each is given to.
SERVICE_SECRETS = {"CORRAL_SECRETS_KEY": "registry", "CORRAL_OTLP_FORWARD_HEADERS": "telemetry"}
T = TypeVar("T")
HealthCheck: TypeAlias = "grpc.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]"


class Launcher:
    def __init__(self, environ: Mapping[str, str]) -> None:
        """The platform `environ` describes; its services inherit `environ`. An HTTP port set to
        "any" is one the OS picks, which the launcher holds (bound, not listening) until it stops,
        so that no one else gets it before its service takes it over."""
        held = {name: HeldPort("0.0.0.0", handover=True) for name in HTTP_PORTS if environ.get(name) == ANY_PORT}
        self.environ = {**environ, **{name: str(port.port) for name, port in held.items()}}
        addrs = _held_addresses(Settings.from_env(self.environ))
        self.held = [*held.values(), *addrs.values()]
        self.environ.update({name: port.address for name, port in addrs.items()})
        # CORRAL_REPLICAS: each further replica's (public, internal) listen addresses.
        self.replicas: dict[str, tuple[str, str]] = self._hold_replicas(
            replicas.parse(self.environ.get(replicas.VARIABLE, "")))
        # Updated as services start: an address asking for port 0 becomes the one its service bound.
        self.settings = Settings.from_env(self.environ)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # The service each process (by its name: "router", "router-2", ...) runs.
        self.service_of: dict[str, str] = {}
        self.outputs: dict[str, OutputTail] = {}
        # When each process (a service, "postgres", "redis") was started, on time.monotonic().
        self.started_at: dict[str, float] = {}
        self.pg: embedded.EmbeddedPostgres | None = None
        self.redis: embedded.EmbeddedRedis | None = None
        self.stopping = False

    def _hold_replicas(self, counts: dict[str, int]) -> dict[str, tuple[str, str]]:
        """Holds two ports (public, internal) for every further replica, and makes each service's
        address settings list all its replicas; its first keeps the addresses it had."""
        settings = Settings.from_env(self.environ)
        found: dict[str, tuple[str, str]] = {}
        for svc, count in counts.items():
            if count == 1:
                continue
            first = (settings.addrs[svc], settings.internal_addrs[svc])
            every = [first]
            for name in replicas.names(svc, count)[1:]:
                ports = (HeldPort(handover=True), HeldPort(handover=True))
                self.held.extend(ports)
                found[name] = (ports[0].address, ports[1].address)
                every.append(found[name])
            upper = svc.upper()
            self.environ.setdefault(f"CORRAL_{upper}_LISTEN", settings.listen[svc])
            self.environ.setdefault(f"CORRAL_{upper}_INTERNAL_LISTEN", settings.internal_listen[svc])
            self.environ[f"CORRAL_{upper}_ADDR"] = ",".join(public for public, _ in every)
            self.environ[f"CORRAL_{upper}_INTERNAL_ADDR"] = ",".join(internal for _, internal in every)
        return found

    def _env(self, svc: str) -> dict[str, str]:
        """The environment of `svc`: secrets only for the services that use them."""
        env = {k: v for k, v in self.environ.items() if k not in SERVICE_SECRETS or SERVICE_SECRETS[k] == svc}
        env["CORRAL_DATA_DIR"] = str(self.settings.data_dir)
        # Ctrl-C reaches the whole process group; the services leave stopping to the launcher.
        env["CORRAL_SUPERVISED"] = "true"
        if self.pg is not None:
            env["CORRAL_DATABASE_URL"] = self.pg.url
        if self.redis is not None:
            env["CORRAL_REDIS_URL"] = self.redis.url
        for name, addr in self.settings.addrs.items():
            env[f"CORRAL_{name.upper()}_ADDR"] = addr
        for name, addr in self.settings.internal_addrs.items():
            env[f"CORRAL_{name.upper()}_INTERNAL_ADDR"] = addr
        env["CORRAL_PKI_DIR"] = str(self.settings.pki_dir)
        if svc == "registry" and not self.settings.secrets_key:
            env["CORRAL_SECRETS_KEY"] = local_secret(self.settings.data_dir, "secrets.key", 32)
        # One machine: tools, webhook receivers and model servers under development listen on
        # localhost (this adds loopback to CORRAL_OUTBOUND_ALLOW).
        env.setdefault("CORRAL_TOOLS_ALLOW_LOOPBACK", "true")
        # The registry keeps a platform administrator's API key here; the corral command finds it.
        env.setdefault("CORRAL_BOOTSTRAP_ADMIN_KEY_FILE", str(self.settings.data_dir / "admin.key"))
        return env

    def start_storage(self) -> None:
        data = self.settings.data_dir
        data.mkdir(parents=True, exist_ok=True)
        if self.settings.database_url:
            log.info("PostgreSQL: %s (from CORRAL_DATABASE_URL)", _redact(self.settings.database_url))
        else:
            t = time.monotonic()
            self.pg = embedded.start_postgres(data / "pg")
            self.started_at["postgres"] = time.monotonic()
            log.info("PostgreSQL: embedded, data in %s (%.1fs)", data / "pg", time.monotonic() - t)
        if self.settings.redis_url:
            log.info("Redis: %s (from CORRAL_REDIS_URL)", _redact(self.settings.redis_url))
        else:
            self.redis = embedded.start_redis(data / "redis")
            self.started_at["redis"] = time.monotonic()
            log.info("Redis: embedded, socket %s", self.redis.socket)

    def ensure_certificates(self) -> None:
        """The service CA and a certificate per service, made once under the data directory
        (CORRAL_PKI_DIR to use your own): the services prove who they are to each other with them."""
        issued = ensure_pki(self.settings.pki_dir, SERVICES)
        if issued:
            log.info("issued service certificates for %s in %s", ", ".join(issued), self.settings.pki_dir)

    def check_ports(self) -> None:
        """Refuses to start beside another platform: its health checks would answer for ours."""
        busy = []
        wanted = dict(self.settings.listen)
        wanted.update({f"{svc} internal": addr for svc, addr in self.settings.internal_listen.items()})
        for svc, port in self.settings.metrics_ports.items():
            if port:
                wanted[f"{svc} /metrics"] = f"0.0.0.0:{port}"
        if self.settings.executor.http_port:
            wanted["executor http"] = f"0.0.0.0:{self.settings.executor.http_port}"
        if self.settings.otlp_http_port:
            wanted["telemetry OTLP/HTTP"] = f"0.0.0.0:{self.settings.otlp_http_port}"
        held = {h.port for h in self.held}
        for svc, listen in wanted.items():
            host, _, number = listen.rpartition(":")
            if int(number) == 0 or int(number) in held:
                continue  # the OS picks these: nothing else can be on them
            with socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET) as s:
                try:
                    s.bind((host.strip("[]"), int(number)))
                except OSError:
                    busy.append(f"{svc} ({listen})")
        if busy:
            raise RuntimeError(
                f"already in use: {', '.join(busy)}. Is another Corral running? Stop it, or choose other "
                "addresses with CORRAL_<SERVICE>_ADDR"
            )

    def start_services(self) -> None:
        for svc in START_ORDER:
            self.start_service(svc)
            for name in sorted(n for n in self.replicas if n.rpartition("-")[0] == svc):
                self.start_service(svc, name)

    def start_service(self, svc: str, name: str = "", timeout: float = 60) -> str:
        """Starts `svc` as a process (called `name` when it is a further instance) and waits until
        it serves; returns the address it reported. The services started after a service's first
        instance are given that address."""
        name = name or svc
        self.service_of[name] = svc
        report = self.settings.data_dir / "run" / f"{name}.address"
        report.unlink(missing_ok=True)  # an earlier run's
        env = {**self._env(svc), "CORRAL_ADDRESS_FILE": str(report)}
        upper = svc.upper()
        if name in self.replicas:
            # A replica of CORRAL_REPLICAS: on the ports held for it, its HTTP ports off (its first
            # replica's serve the metrics of one; Kubernetes scrapes every pod).
            env[f"CORRAL_{upper}_LISTEN"], env[f"CORRAL_{upper}_INTERNAL_LISTEN"] = self.replicas[name]
            env.update({port: "0" for port in HTTP_PORTS})
            if svc == "executor":
                # Bundles, sandboxes, signing keys and the executor's name are one executor's own.
                env["CORRAL_DATA_DIR"] = str(self.settings.data_dir / name)
        elif name != svc:
            # A further instance listens on ports of its own (the OS picks them), not its first
            # instance's; it reports them like any other.
            env[f"CORRAL_{upper}_LISTEN"] = f"{self.settings.addrs[svc].rpartition(':')[0]}:0"
            env[f"CORRAL_{upper}_INTERNAL_LISTEN"] = (
                f"{self.settings.internal_addrs[svc].rpartition(':')[0]}:0")
        # A child inherits an ignored SIGINT through exec, so Ctrl-C during its start-up does not
        # kill it half-way; the launcher stops it with SIGTERM in order instead.
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            proc = self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", f"services.{svc}"], env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )
        finally:
            signal.signal(signal.SIGINT, handler)
        self.started_at[name] = time.monotonic()
        # Its output goes on to the launcher's, the last lines kept for when it dies.
        assert proc.stdout is not None
        self.outputs[name] = OutputTail(name, proc.stdout, sys.stderr.buffer)
        deadline = time.monotonic() + timeout
        addr, internal = self._wait(
            name, deadline, f"{name} reported no address within {timeout:.0f}s",
            lambda: _reported(report))
        with grpc.insecure_channel(addr) as channel:
            check = _health_check(channel)
            self._wait(name, deadline, f"{name} did not become healthy on {addr} within {timeout:.0f}s",
                       lambda: _serving(check))
        log.info("%-9s serving on %s (pid %d)", name, addr, self.procs[name].pid)
        if name == svc and len(addresses.replicas(self.settings.addrs[svc])) == 1:
            self.settings = self.settings.with_address(svc, addr, internal)
        return addr

    def _wait(self, name: str, deadline: float, failure: str, probe: Callable[[], T | None]) -> T:
        """`probe()` once it answers, while process `name` lives and the launcher is not stopping."""
        proc = self.procs[name]
        while True:
            if self.stopping:
                raise Interrupted
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({describe_exit(proc.returncode)}) while starting (see its log above)")
            if (found := probe()) is not None:
                return found
            if time.monotonic() > deadline:
                raise RuntimeError(failure)
            time.sleep(0.1)

    def client_environ(self) -> dict[str, str]:
        """The variables that point a client (the corral command, a test) at this platform."""
        env = {f"CORRAL_{svc.upper()}_ADDR": addr for svc, addr in self.settings.addrs.items()}
        env.update({name: self.environ[name] for name in HTTP_PORTS if name in self.environ})
        return env

    def publish_example(self) -> None:
        client = CorralClient(ClientConfig.from_env(self._env("router")))
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
        for name, proc in reversed(list(self.procs.items())):
            del self.procs[name]
            if embedded.stop_process(proc, grace_s=15):
                log.warning("%s did not stop in 15s; killed it", name)
        for port in self.held:
            port.close()
        if self.redis is not None:
            self.redis.stop()
        if self.pg is not None:
            self.pg.stop()
        log.info("stopped")

    def supervise(self) -> None:
        """Until Ctrl-C or SIGTERM: whatever dies (a service, the embedded PostgreSQL or Redis) is
        started again in its place, with back-off (services/launcher/supervisor.py)."""
        children: list[Child] = []
        if self.pg is not None:
            children.append(EmbeddedPostgresChild(self.pg))
        if self.redis is not None:
            children.append(EmbeddedRedisChild(self))
        children.extend(ServiceChild(self, name) for name in self.procs)
        supervisor = Supervisor(children, self.started_at)
        try:
            while not self.stopping:
                supervisor.check()
                time.sleep(0.2)
        except Interrupted:
            pass


def _held_addresses(settings: Settings) -> dict[str, HeldPort]:
    """A port held now for each service address asking for port 0 (public and internal): every
    service then knows every other's address from the start, whatever the order they start in
    (sessions and telemetry verify API keys with the registry, which starts after them)."""
    held: dict[str, HeldPort] = {}
    for svc in SERVICES:
        for variable, address in (
            (f"CORRAL_{svc.upper()}_ADDR", settings.addrs[svc]),
            (f"CORRAL_{svc.upper()}_INTERNAL_ADDR", settings.internal_addrs[svc]),
        ):
            host, _, port = address.rpartition(":")
            if port == "0" and host in ("127.0.0.1", "0.0.0.0"):
                held[variable] = HeldPort(host, handover=True)
    return held


def local_secret(data_dir: Path, name: str, size: int) -> str:
    """A random secret made once and kept beside the embedded databases (mode 0600), for what
    the environment does not set: the key that encrypts tool secrets at rest (they must survive
    a restart)."""
    path = data_dir / name
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(secrets.token_bytes(size)).decode())
        log.info("generated %s (set it in the environment to use your own)", path)
    return path.read_text().strip()


def _reported(path: Path) -> tuple[str, str] | None:
    """The public and internal addresses a service wrote to `path` once it served (see
    services.common.server)."""
    try:
        public, _, internal = path.read_text().strip().partition(" ")
    except FileNotFoundError:
        return None
    return (public, internal) if public and internal else None


def _health_check(channel: grpc.Channel) -> HealthCheck:
    # Built by hand: the typing stubs' HealthStub declares no methods.
    return channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )


def _serving(check: HealthCheck) -> health_pb2.HealthCheckResponse | None:
    """The server's health once it says SERVING."""
    try:
        reply = check(health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.RpcError:
        return None
    return reply if reply.status == health_pb2.HealthCheckResponse.SERVING else None


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
  telemetry  {a['telemetry']}   (OTLP traces in, traces and metrics out; OTLP/HTTP http://127.0.0.1:{settings.otlp_http_port}/v1/traces)
  Prometheus http://127.0.0.1:{settings.executor.http_port}/metrics (invocations, tools, tokens, sandboxes), :{settings.metrics_ports['registry']}/metrics (rollouts), :{settings.metrics_ports['telemetry']}/metrics (span intake), :{settings.metrics_ports['router']}, :{settings.metrics_ports['sessions']} (RPCs); deploy/prometheus, deploy/grafana
  JWKS       http://127.0.0.1:{settings.executor.http_port}/.well-known/jwks.json (verifies invocation credentials)
  data       {settings.data_dir}
  admin key  {settings.data_dir / 'admin.key'}   (the corral command uses it on this machine)

In another terminal (the corral command is in .venv/bin):
  source .venv/bin/activate
  corral invoke progress-report --endpoint prod --session demo --data '{{"text": "Client reports better sleep."}}'
  corral publish examples/progress-report-v2
  corral endpoint set progress-report prod --split 1=90,2=10
  corral chat progress-report --endpoint prod
  corral traces --agent progress-report --version 1
  corral metrics progress-report
A process that dies is started again (said here). Press Ctrl-C to stop everything.
"""


def main() -> int:
    launcher = Launcher(inherited_environment())
    setup_logging("launcher", launcher.settings.log_level)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        launcher.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        launcher.check_ports()
        launcher.ensure_certificates()
        launcher.start_storage()
        launcher.start_services()
        launcher.publish_example()
        # For whoever started the launcher with port 0 somewhere (the end-to-end tests).
        (launcher.settings.data_dir / "addresses.json").write_text(json.dumps(launcher.client_environ()))
        print(banner(launcher.settings), flush=True)
        launcher.supervise()
    except Exception as exc:  # noqa: BLE001 - one clear line, then a clean stop
        if not launcher.stopping:
            log.error("could not start the platform: %s", exc)
            code = 1
    finally:
        launcher.stop()
    return code


def issue_certificates(args: list[str]) -> int:
    """`python -m services.launcher pki DIR [HOST...]`: a service CA and a certificate per service
    in DIR, valid for HOST names and addresses besides localhost (for a deployment without
    cert-manager). Give each service only ca.crt and its own .crt and .key; keep ca.key apart."""
    if not args:
        print("usage: python -m services.launcher pki DIR [HOST...]", file=sys.stderr)
        return 2
    issued = ensure_pki(Path(args[0]), SERVICES, hosts=[*LOCAL_HOSTS, *args[1:]])
    print(f"issued certificates for {', '.join(issued) or 'no service (all current)'} in {args[0]}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["pki"]:
        sys.exit(issue_certificates(sys.argv[2:]))
    sys.exit(main())
