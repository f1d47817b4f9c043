"""Service certificates and principal assertions: what a service proves on an internal hop, and
what a forger cannot."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import jwt
import pytest

from services.common import identity
from services.common.auth.assertions import AssertionSigner, AssertionVerifier
from services.common.auth.interceptor import Authenticator, authorize
from services.common.auth.methods import METHODS
from services.common.auth.pki import PkiError, ensure_pki, load_identity
from services.common.auth.principal import CredentialKind, Principal, Role
from services.common.errors import PermissionDenied, Unauthenticated

ALICE = Principal("acme", "alice", frozenset({Role.OPERATOR}), CredentialKind.API_KEY, "k1")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki") / "pki"
    assert ensure_pki(directory, ["router", "executor"]) == ["router", "executor"]
    return directory


def test_keys_are_private_and_certificates_are_made_once(pki: Path) -> None:
    assert stat.S_IMODE((pki / "router.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((pki / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700
    assert ensure_pki(pki, ["router", "executor"]) == []


def test_a_missing_or_foreign_certificate_is_refused_by_name(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="sessions.crt"):
        load_identity(pki, "sessions")
    other = tmp_path / "other"
    ensure_pki(other, ["router"])
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "ca.crt").write_bytes((pki / "ca.crt").read_bytes())
    for name in ("router.crt", "router.key"):
        (tmp_path / "mixed" / name).write_bytes((other / name).read_bytes())
    with pytest.raises(PkiError, match="not issued by"):
        load_identity(tmp_path / "mixed", "router")


def test_an_assertion_carries_the_principal_to_the_next_hop(pki: Path) -> None:
    router = load_identity(pki, "router")
    token = AssertionSigner(router).sign(ALICE)
    assert AssertionVerifier(router.ca).verify(token) == ALICE


def test_an_assertion_signed_outside_the_ca_is_refused(pki: Path, tmp_path: Path) -> None:
    ensure_pki(tmp_path / "rogue", ["router"])
    rogue = load_identity(tmp_path / "rogue", "router")
    token = AssertionSigner(rogue).sign(ALICE)
    with pytest.raises(Unauthenticated, match="not a Corral service"):
        AssertionVerifier(load_identity(pki, "router").ca).verify(token)


def test_a_tampered_assertion_is_refused(pki: Path) -> None:
    router = load_identity(pki, "router")
    head, body, sig = AssertionSigner(router).sign(ALICE).split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["tenant"] = "globex"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    with pytest.raises(Unauthenticated):
        AssertionVerifier(router.ca).verify(f"{head}.{forged}.{sig}")
    unsigned = jwt.encode({"tenant": "globex", "sub": "eve"}, key="", algorithm="none")
    with pytest.raises(Unauthenticated):
        AssertionVerifier(router.ca).verify(unsigned)


class _Keys:
    async def verify(self, credential: str) -> Principal:
        if credential == "crl_good_secret":
            return ALICE
        raise Unauthenticated("the API key is not valid")


async def test_headers_name_a_tenant_only_for_a_service_peer(pki: Path) -> None:
    auth = Authenticator(AssertionVerifier(load_identity(pki, "router").ca), api_keys=_Keys())
    forged = {"authorization": "Bearer crl_good_secret", "x-corral-tenant": "globex",
              "x-corral-principal": "forged"}
    assert (await auth.verify(forged, peer=None)).principal == ALICE
    service = await auth.verify({"x-corral-tenant": "globex"}, peer="executor")
    assert service.principal == Principal.of_service("executor", "globex")
    for missing in ({}, {"authorization": "Basic abc"}, {"authorization": "Bearer nonsense"},
                    {"authorization": "Bearer crl_bad"}):
        with pytest.raises(Unauthenticated):
            await auth.verify(missing, peer=None)


def test_authorize_names_what_is_missing() -> None:
    create = METHODS["/corral.registry.v1.RegistryService/CreateAgent"]
    viewer = identity.Verified(Principal("acme", "vic", frozenset({Role.VIEWER})))
    with pytest.raises(PermissionDenied, match="viewer.*CreateAgent needs the operator role"):
        authorize(create, viewer, None, "/corral.registry.v1.RegistryService/CreateAgent")
    execute = METHODS["/corral.executor.v1.ExecutorService/Execute"]
    with pytest.raises(PermissionDenied, match="service identity"):
        authorize(execute, identity.Verified(ALICE), None, "/x/Execute")
    with pytest.raises(PermissionDenied, match="telemetry service may not"):
        authorize(execute, identity.Verified(Principal.of_service("telemetry")), "telemetry", "/x/Execute")
    authorize(execute, identity.Verified(ALICE), "router", "/x/Execute")  # the router relays alice
