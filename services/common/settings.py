"""Typed settings, read once from the environment and passed down explicitly."""

from __future__ import annotations

import enum
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import unquote

from services.common import addresses
from services.common.auth.oidc import IssuerConfigError, OidcIssuer, parse_issuers
from services.common.export_buffer import BufferLimits
from services.common.outbound import Network, allow_list, parse_allow

DEFAULT_PORTS = {
    "router": 50051,
    "registry": 50052,
    "sessions": 50053,
    "executor": 50054,
    "telemetry": 50055,
}
SERVICES = tuple(DEFAULT_PORTS)
# Each service's internal listener (mutual TLS, for the other services) is its port plus this.
INTERNAL_PORT_OFFSET = 10
# Each service after those it calls (registry → telemetry, sessions; executor → sessions, registry,
# telemetry; router → registry, sessions, executor): one listening on port 0 is known only once it
# has started, so it can be given only to those started after it. The calls back (every service
# verifying API keys with the registry, telemetry asking sessions about a session it has no spans
# of) work because the launcher and the tests pick and hold every port 0 up front. The registry's
# call to the executor (CheckVersion, at publish) is made only once both serve.
START_ORDER = ("telemetry", "sessions", "registry", "executor", "router")


class StartCheck(enum.StrEnum):
    """What the registry does at publish before DEFAULT moves (CORRAL_START_CHECK)."""

    # An executor starts the version once; when none answers, publish fails UNAVAILABLE.
    REQUIRED = "required"
    # As REQUIRED, but when no executor answers the version is published unchecked.
    IF_REACHABLE = "if_reachable"
    # Versions are published without being started.
    OFF = "off"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None


def _non_negative(env: Mapping[str, str], name: str, default: int, unit: str = "days") -> int:
    value = _int(env, name, default)
    if value < 0:
        raise SettingsError(f"{name}={value} must be 0 (off) or a number of {unit}")
    return value


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 1:
        raise SettingsError(f"{name}={value} must be at least 1")
    return value


def _bytes(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 0:
        raise SettingsError(f"{name}={value} must be a number of bytes (0: none)")
    return value


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 1:
        raise SettingsError(f"{name}={value} must be a positive number of seconds")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise SettingsError(f"{name}={raw!r} must be positive")
    return value


def _prices(env: Mapping[str, str], name: str) -> dict[str, tuple[float, float]]:
    """`{"gpt-4o-mini": {"input": 0.15, "output": 0.6}}`: US dollars per million tokens."""
    raw = env.get(name, "").strip()
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
        prices = {
            str(model): (float(p["input"]), float(p["output"])) for model, p in doc.items()
        }
    except (ValueError, TypeError, KeyError, AttributeError):
        raise SettingsError(
            f'{name} must be JSON like {{"gpt-4o-mini": {{"input": 0.15, "output": 0.6}}}} '
            "(US dollars per million input and output tokens)"
        ) from None
    if any(v < 0 or not math.isfinite(v) for pair in prices.values() for v in pair):
        raise SettingsError(f"{name}: prices must be finite and not negative")
    return prices


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use true or false)")


@dataclass(frozen=True)
class ExecutorSettings:
    # The hard cap on sandbox processes: bound to sessions, warm, starting, stopping, start checks.
    # At the cap a new session stops the least recently used sandbox idle for evict_idle_s (its
    # state is persisted) or, with none, is refused at once (RESOURCE_EXHAUSTED EXECUTOR_AT_CAPACITY).
    max_live_sandboxes: int = 64
    evict_idle_s: float = 2.0
    # Sandboxes starting at once (importing the agent is CPU-bound), and new sessions that may
    # wait (a few seconds at most) for their turn to start one: more are refused, as above.
    max_starting: int = 4
    start_queue: int = 16
    # Invocations that may wait for their session's running one, and how long each may wait.
    session_queue: int = 4
    session_queue_wait_s: float = 5.0
    # Seconds a session lease lives without renewal.
    lease_ttl_s: int = 30
    # Seconds the executor waits for the sessions service to acquire, renew or release a lease.
    lease_call_timeout_s: float = 10.0
    # Largest payload accepted by an invocation, in bytes.
    max_payload_bytes: int = 4 * 1024 * 1024
    python: str = ""
    # bwrap (isolating; the default where bubblewrap is installed), gvisor, or process (no isolation).
    sandbox_driver: str = ""
    # Sandboxes kept started per warm version (0: no warm pools), and at most this many in all.
    warm_pool_size: int = 1
    warm_pool_max_total: int = 16
    # The executor's HTTP port: /metrics, /.well-known/jwks.json, revocation checks (0: off).
    http_port: int = 9466
    # Hours an invocation-credential signing key signs before the next one takes over.
    key_rotation_hours: float = 24.0
    # An OpenAI-compatible server for manifests pinning provider "openai" (none: refused).
    openai_base_url: str = ""
    openai_api_key: str = field(default="", repr=False)
    # Seconds the start check at publish (CheckVersion) gives a version to start.
    start_check_timeout_s: float = 30.0
    # Spans and log records held while telemetry cannot take them (memory, then disk).
    telemetry_buffer: BufferLimits = field(default_factory=BufferLimits)
    # Its name in the fleet (CORRAL_EXECUTOR_NAME; "": generated once, kept in the data dir).
    name: str = ""
    # host:port where the other services reach it (CORRAL_EXECUTOR_ADVERTISE; "": its internal
    # listener as bound).
    advertise: str = ""
    # How many executors of the fleet keep each version's warm pool (CORRAL_WARM_POOL_REPLICAS).
    warm_pool_replicas: int = 2


@dataclass(frozen=True)
class OtlpForward:
    """Telemetry's forwarding of every export it accepts to another OTLP backend (Jaeger, Tempo, a
    vendor): CORRAL_OTLP_FORWARD, its headers and the exports it may hold while the backend lags."""

    # host:port (plain gRPC), http://host:port (plain) or https://host:port (TLS); "" is off.
    endpoint: str = ""
    # Sent with each export, e.g. the vendor's API key: kept out of repr.
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    queue: int = 1000


@dataclass(frozen=True)
class StorePools:
    """How many connections a service keeps to PostgreSQL and Redis, and how long a call waits for
    one (a free one, or a new one to connect) before it is answered RESOURCE_EXHAUSTED (every one
    busy) or UNAVAILABLE (the store does not answer)."""

    db_min: int = 1
    db_max: int = 10
    redis_max: int = 50
    wait_s: float = 5.0


def _pools(env: Mapping[str, str]) -> StorePools:
    pools = StorePools(
        db_min=_int(env, "CORRAL_DB_POOL_MIN", StorePools.db_min),
        db_max=_int(env, "CORRAL_DB_POOL_MAX", StorePools.db_max),
        redis_max=_int(env, "CORRAL_REDIS_MAX_CONNECTIONS", StorePools.redis_max),
        wait_s=_float(env, "CORRAL_STORE_WAIT_S", StorePools.wait_s),
    )
    if pools.db_max < 1 or pools.redis_max < 1:
        raise SettingsError("CORRAL_DB_POOL_MAX and CORRAL_REDIS_MAX_CONNECTIONS must be at least 1")
    if not 0 <= pools.db_min <= pools.db_max:
        raise SettingsError(
            f"CORRAL_DB_POOL_MIN={pools.db_min} must be between 0 and CORRAL_DB_POOL_MAX={pools.db_max}"
        )
    return pools


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str | None
    redis_url: str | None
    # Prefix for every Redis key, so several deployments (or test runs) can share one Redis.
    redis_prefix: str
    addrs: Mapping[str, str]
    # Where each service listens; defaults to its address.
    listen: Mapping[str, str]
    # Export spans over OTLP to telemetry (off only in unit tests).
    tracing: bool
    # Record a span per internal RPC, not only per invocation.
    rpc_spans: bool
    log_level: str
    # Prometheus /metrics ports (0: off), per service: RPC metrics in each, rollouts in registry's,
    # span intake in telemetry's. The executor's are on its HTTP port (ExecutorSettings.http_port).
    metrics_ports: Mapping[str, int] = field(default_factory=dict)
    # Telemetry's OTLP/HTTP receiver (POST /v1/traces; 0: off). 4318 is OTLP/HTTP's usual port.
    otlp_http_port: int = 0
    otlp_forward: OtlpForward = field(default_factory=OtlpForward)
    # Each service's connection pools to PostgreSQL and Redis (CORRAL_DB_POOL_MIN/MAX,
    # CORRAL_REDIS_MAX_CONNECTIONS, CORRAL_STORE_WAIT_S).
    pools: StorePools = field(default_factory=StorePools)
    # Calls one service handles at once (a stream counts until it ends); more are refused at once
    # (RESOURCE_EXHAUSTED SERVER_BUSY, with a retry delay). Health checks are never refused.
    max_concurrent_rpcs: int = 1000
    # Started by the launcher: SIGINT is ignored and SIGTERM (sent in dependency order) stops it.
    supervised: bool = False
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)
    # Base64 of the 32-byte key that encrypts tool secrets at rest (registry). Kept out of repr so
    # that logging the settings cannot print it.
    secrets_key: str = field(default="", repr=False)
    # Telemetry's price list: model id -> US dollars per million (input, output) tokens.
    model_prices: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    # Set by the launcher: the file where the service writes the address it serves on once it is
    # up, so that an address with port 0 becomes the port the OS picked.
    address_file: Path | None = None
    # Where services reach each other: each one's internal listener, which requires a client
    # certificate from the service CA (mutual TLS). Defaults to the public port plus 10.
    internal_addrs: Mapping[str, str] = field(default_factory=dict)
    internal_listen: Mapping[str, str] = field(default_factory=dict)
    # The service CA and the services' certificates and keys (see services/common/auth/pki.py).
    pki_dir: Path = Path(".corral/pki")
    # The service these settings were given to (set by the host that runs it; "" for a client).
    service: str = ""
    # Identity providers whose bearer tokens (JWTs) the services accept (CORRAL_OIDC_ISSUERS).
    oidc_issuers: tuple[OidcIssuer, ...] = ()
    # How long a verified credential (or a refusal) is reused without asking again: the longest a
    # revoked API key is still honoured after RevokeKey, per service.
    credential_cache_s: float = 5.0
    # Registry: keep a valid platform administrator's API key in this file (mode 0600), making
    # one when the file is missing or its key is not valid. `make run` sets .corral/admin.key.
    bootstrap_admin_key_file: Path | None = None
    # Non-public networks the platform may connect to on someone's behalf (tools, webhooks, the
    # model provider): CORRAL_OUTBOUND_ALLOW, plus loopback with CORRAL_TOOLS_ALLOW_LOOPBACK=true
    # (a one-machine set-up: `make run` turns it on). See services/common/outbound.py.
    outbound_allow: tuple[Network, ...] = ()
    # Registry: versions unused this many days are deleted, unless something keeps them (an
    # endpoint, a running rollout or experiment, an active session; never an agent's newest).
    # 0 turns retention off.
    version_retention_days: int = 45
    # Registry: whether a version is started once before DEFAULT moves to it (CORRAL_START_CHECK).
    start_check: StartCheck = StartCheck.REQUIRED
    # Sessions: how long a turn committed under a request id answers a retry with its result
    # (CORRAL_REQUEST_RETENTION_S); older results are deleted.
    request_retention_s: int = 24 * 3600

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        addrs = {
            svc: env.get(f"CORRAL_{svc.upper()}_ADDR") or f"127.0.0.1:{port}"
            for svc, port in DEFAULT_PORTS.items()
        }
        internal = {
            svc: env.get(f"CORRAL_{svc.upper()}_INTERNAL_ADDR") or _offset(addrs[svc])
            for svc in SERVICES
        }
        try:
            for svc in SERVICES:
                addresses.check(addrs[svc], f"CORRAL_{svc.upper()}_ADDR")
                addresses.check(internal[svc], f"CORRAL_{svc.upper()}_INTERNAL_ADDR")
            # A list of replicas is where a service is reached; each replica listens on its own.
            listen = {
                svc: env.get(f"CORRAL_{svc.upper()}_LISTEN")
                or addresses.listen_address(addrs[svc], f"CORRAL_{svc.upper()}_LISTEN")
                for svc in SERVICES
            }
            internal_listen = {
                svc: env.get(f"CORRAL_{svc.upper()}_INTERNAL_LISTEN")
                or addresses.listen_address(internal[svc], f"CORRAL_{svc.upper()}_INTERNAL_LISTEN")
                for svc in SERVICES
            }
            for svc in SERVICES:
                addresses.check(listen[svc], f"CORRAL_{svc.upper()}_LISTEN")
                addresses.check(internal_listen[svc], f"CORRAL_{svc.upper()}_INTERNAL_LISTEN")
        except addresses.AddressError as exc:
            raise SettingsError(str(exc)) from None
        data_dir = Path(env.get("CORRAL_DATA_DIR") or ".corral").resolve()
        return cls(
            data_dir=data_dir,
            internal_addrs=internal,
            internal_listen=internal_listen,
            pki_dir=Path(env.get("CORRAL_PKI_DIR") or data_dir / "pki").resolve(),
            database_url=env.get("CORRAL_DATABASE_URL") or None,
            redis_url=env.get("CORRAL_REDIS_URL") or None,
            redis_prefix=env.get("CORRAL_REDIS_PREFIX", "corral:"),
            pools=_pools(env),
            max_concurrent_rpcs=_positive_int(env, "CORRAL_MAX_CONCURRENT_RPCS", 1000),
            addrs=addrs,
            listen=listen,
            tracing=_bool(env, "CORRAL_TRACING", True),
            rpc_spans=_bool(env, "CORRAL_RPC_SPANS", False),
            log_level=env.get("CORRAL_LOG_LEVEL", "INFO").upper(),
            supervised=_bool(env, "CORRAL_SUPERVISED", False),
            metrics_ports={
                "telemetry": _int(env, "CORRAL_TELEMETRY_METRICS_PORT", 9464),
                "registry": _int(env, "CORRAL_REGISTRY_METRICS_PORT", 9465),
                "router": _int(env, "CORRAL_ROUTER_METRICS_PORT", 9467),
                "sessions": _int(env, "CORRAL_SESSIONS_METRICS_PORT", 9468),
            },
            otlp_http_port=_int(env, "CORRAL_OTLP_HTTP_PORT", 4318),
            otlp_forward=OtlpForward(
                endpoint=env.get("CORRAL_OTLP_FORWARD", "").strip(),
                headers=_headers(env, "CORRAL_OTLP_FORWARD_HEADERS"),
                queue=_int(env, "CORRAL_OTLP_FORWARD_QUEUE", 1000),
            ),
            executor=ExecutorSettings(
                max_live_sandboxes=_int(env, "CORRAL_EXECUTOR_MAX_SANDBOXES", 64),
                evict_idle_s=_float(env, "CORRAL_EXECUTOR_EVICT_IDLE_S", 2.0),
                max_starting=_positive_int(env, "CORRAL_EXECUTOR_MAX_STARTING", 4),
                start_queue=_non_negative(env, "CORRAL_EXECUTOR_START_QUEUE", 16, "sessions"),
                session_queue=_non_negative(env, "CORRAL_SESSION_QUEUE", 4, "invocations"),
                session_queue_wait_s=_float(env, "CORRAL_SESSION_QUEUE_WAIT_S", 5.0),
                lease_ttl_s=_int(env, "CORRAL_EXECUTOR_LEASE_TTL_S", 30),
                lease_call_timeout_s=_float(env, "CORRAL_EXECUTOR_LEASE_CALL_TIMEOUT_S", 10.0),
                max_payload_bytes=_int(env, "CORRAL_MAX_PAYLOAD_BYTES", 4 * 1024 * 1024),
                python=env.get("CORRAL_SANDBOX_PYTHON", ""),
                sandbox_driver=env.get("CORRAL_SANDBOX_DRIVER", ""),
                warm_pool_size=_int(env, "CORRAL_WARM_POOL_SIZE", 1),
                warm_pool_max_total=_int(env, "CORRAL_WARM_POOL_MAX_TOTAL", 16),
                http_port=_int(env, "CORRAL_EXECUTOR_HTTP_PORT", 9466),
                key_rotation_hours=_float(env, "CORRAL_KEY_ROTATION_HOURS", 24.0),
                openai_base_url=env.get("CORRAL_OPENAI_BASE_URL", "").strip(),
                openai_api_key=env.get("CORRAL_OPENAI_API_KEY", ""),
                start_check_timeout_s=_float(env, "CORRAL_START_CHECK_TIMEOUT_S", 30.0),
                telemetry_buffer=BufferLimits(
                    memory_bytes=_bytes(
                        env, "CORRAL_TELEMETRY_BUFFER_MEMORY_BYTES", BufferLimits.memory_bytes),
                    disk_bytes=_bytes(
                        env, "CORRAL_TELEMETRY_BUFFER_DISK_BYTES", BufferLimits.disk_bytes),
                ),
                name=env.get("CORRAL_EXECUTOR_NAME", "").strip(),
                advertise=env.get("CORRAL_EXECUTOR_ADVERTISE", "").strip(),
                warm_pool_replicas=_int(env, "CORRAL_WARM_POOL_REPLICAS", 2),
            ),
            secrets_key=env.get("CORRAL_SECRETS_KEY", ""),
            model_prices=_prices(env, "CORRAL_MODEL_PRICES"),
            address_file=Path(env["CORRAL_ADDRESS_FILE"]) if env.get("CORRAL_ADDRESS_FILE") else None,
            oidc_issuers=_issuers(env.get("CORRAL_OIDC_ISSUERS", "")),
            credential_cache_s=_float(env, "CORRAL_CREDENTIAL_CACHE_S", 5.0),
            bootstrap_admin_key_file=_path(env, "CORRAL_BOOTSTRAP_ADMIN_KEY_FILE"),
            outbound_allow=_outbound_allow(env),
            version_retention_days=_non_negative(env, "CORRAL_VERSION_RETENTION_DAYS", 45),
            request_retention_s=_positive(env, "CORRAL_REQUEST_RETENTION_S", 24 * 3600),
            start_check=_start_check(env.get("CORRAL_START_CHECK", "required")),
        )

    def with_address(self, service: str, address: str, internal: str | None = None) -> Settings:
        """These settings with `service` reached at `address` (and its internal listener at
        `internal`): where it really listens, once a service asked for port 0 has started."""
        internal_addrs = {**self.internal_addrs, service: internal or self.internal_addrs[service]}
        return replace(self, addrs={**self.addrs, service: address}, internal_addrs=internal_addrs)

    def for_service(self, service: str) -> Settings:
        """These settings as given to `service`: it calls the others with its own identity."""
        return replace(self, service=service)

    def require_database(self) -> str:
        return _required(self.database_url, "CORRAL_DATABASE_URL", "PostgreSQL")

    def require_redis(self) -> str:
        return _required(self.redis_url, "CORRAL_REDIS_URL", "Redis")


def _start_check(raw: str) -> StartCheck:
    try:
        return StartCheck(raw.strip().lower())
    except ValueError:
        raise SettingsError(
            f"CORRAL_START_CHECK={raw!r} is not one of {', '.join(StartCheck)}"
        ) from None


def _outbound_allow(env: Mapping[str, str]) -> tuple[Network, ...]:
    try:
        networks = parse_allow(env.get("CORRAL_OUTBOUND_ALLOW", ""))
    except ValueError as exc:
        raise SettingsError(f"CORRAL_OUTBOUND_ALLOW: {exc}") from None
    return allow_list(networks, _bool(env, "CORRAL_TOOLS_ALLOW_LOOPBACK", False))


_HEADER_NAME = re.compile(r"^[a-z0-9_.-]+$")


def _headers(env: Mapping[str, str], name: str) -> tuple[tuple[str, str], ...]:
    """`key=value,key2=value2` (values URL-encoded), as OTEL_EXPORTER_OTLP_HEADERS has them."""
    pairs = []
    for item in env.get(name, "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not _HEADER_NAME.match(key):
            raise SettingsError(
                f"{name} must be key=value pairs separated by commas (lower-case keys of letters, "
                "digits, '-', '_', '.'), e.g. x-api-key=SECRET"
            )
        pairs.append((key, unquote(value.strip())))
    return tuple(pairs)


def _issuers(text: str) -> tuple[OidcIssuer, ...]:
    try:
        return parse_issuers(text)
    except IssuerConfigError as exc:
        raise SettingsError(str(exc)) from None


def _offset(address: str) -> str:
    """The internal address beside a public one (each replica's, for a list): the same host, the
    port plus 10 (port 0 stays 0, for a port the OS picks)."""
    return ",".join(_offset_one(part) for part in addresses.replicas(address))


def _offset_one(address: str) -> str:
    host, _, port = address.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        return address
    return f"{host}:{number + INTERNAL_PORT_OFFSET if number else 0}"
def _path(env: Mapping[str, str], name: str) -> Path | None:
    return Path(env[name]).resolve() if env.get(name) else None


def _required(url: str | None, variable: str, server: str) -> str:
    if not url:
        raise SettingsError(
            f"{variable} is not set: point it at {server}, or start the platform with "
            "`make run`, which starts an embedded one"
        )
    return url


def inherited_environment(**overrides: str) -> dict[str, str]:
    """This process's environment plus `overrides`, for a child process (the launcher's
    services): the one other place besides Settings.from_env that reads the environment."""
    return {**os.environ, **overrides}
