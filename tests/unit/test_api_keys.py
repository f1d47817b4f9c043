"""API keys without a database: the key's form, the rules of who may make and use which key, the
verifier cache in front of the registry, and how a client finds its credential."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from corral.config import ClientConfig, ConfigError, is_loopback
from services.common.auth import apikeys
from services.common.auth.apikeys import MalformedKey, parse_key
from services.common.auth.key_client import CachedKeyVerifier
from services.common.auth.principal import CredentialKind, Principal, Role
from services.common.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from services.registry import key_rules
from services.registry.key_model import KeyDraft, KeyRecord, KeySpec
from tests.fakes.common import T0

# -- the key's form ------------------------------------------------------------------------------


def test_a_new_key_parses_back_to_itself_and_matches_only_its_own_hash() -> None:
    key = apikeys.new_key()
    text = str(key)
    assert text.startswith("crl_") and apikeys.looks_like_api_key(text)
    assert parse_key(text) == key
    assert len(key.secret) == 52 and len(key.id) == 16, "32 random bytes of secret, a short id"
    assert key.matches(apikeys.hash_secret(key.secret))
    assert not key.matches(apikeys.new_key().secret_hash)
    assert key.secret not in repr(key), "a logged key does not show its secret"
    assert apikeys.new_key() != key


@pytest.mark.parametrize("text", [
    "", "Bearer crl_x", "eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "crl_", "crl_" + "a" * 16,
    "crl_" + "a" * 16 + "_" + "b" * 51, "crl_" + "A" * 16 + "_" + "b" * 52,
    "crl_" + "a" * 15 + "_" + "b" * 53, "crl_" + "a" * 16 + "_" + "b" * 52 + "\n",
])
def test_anything_but_a_whole_key_is_malformed(text: str) -> None:
    with pytest.raises(MalformedKey) as refused:
        parse_key(text)
    assert "b" * 20 not in str(refused.value), "the message does not repeat the secret"


# -- rules ---------------------------------------------------------------------------------------


def principal(tenant: str = "acme", role: Role | None = Role.ADMIN, platform: bool = False) -> Principal:
    return Principal(tenant=tenant, subject="ada", roles=frozenset({role}) if role else frozenset(),
                     kind=CredentialKind.API_KEY, credential="k1", platform_admin=platform)


def record(**fields: object) -> KeyRecord:
    base = KeyRecord(id="a" * 16, tenant="acme", display_name="ci", role=Role.OPERATOR,
                     platform_admin=False, secret_hash=b"h" * 32, creator="ada", create_time=T0,
                     expire_time=None, last_use_time=None, revoke_time=None)
    return replace(base, **fields)  # type: ignore[arg-type]


def test_a_draft_becomes_a_spec_in_the_callers_tenant_unless_it_names_one() -> None:
    spec = key_rules.key_spec(principal(), KeyDraft(role=2, ttl=timedelta(days=90)), T0)
    assert spec == KeySpec("acme", "", Role.INVOKER, False, T0 + timedelta(days=90))
    assert key_rules.key_spec(principal(), KeyDraft(tenant="beta", role=1), T0).tenant == "beta"


@pytest.mark.parametrize(("draft", "field"), [
    (KeyDraft(role=0), "key.role"),
    (KeyDraft(role=9), "key.role"),
    (KeyDraft(role=1, display_name="has space"), "key.display_name"),
    (KeyDraft(role=1, display_name="-leading"), "key.display_name"),
    (KeyDraft(role=1, display_name="ci\n"), "key.display_name"),
    (KeyDraft(role=1, display_name="x" * 64), "key.display_name"),
    (KeyDraft(role=1, ttl=timedelta(0)), "key.ttl"),
    (KeyDraft(role=1, ttl=timedelta(days=3651)), "key.ttl"),
    (KeyDraft(role=1, expire_time=T0), "key.expire_time"),
    (KeyDraft(role=1, expire_time=T0 + timedelta(days=4000)), "key.expire_time"),
    (KeyDraft(role=1, tenant="no/slash"), "tenant"),
])
def test_bad_drafts_name_their_field(draft: KeyDraft, field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        key_rules.key_spec(principal(), draft, T0)
    assert [v.field for v in refused.value.violations] == [field]


def test_keys_are_managed_by_their_tenants_admins_and_platform_administrators() -> None:
    key_rules.check_manage(principal(), "acme", "CreateKey")
    key_rules.check_manage(principal("default", platform=True), "acme", "CreateKey")
    key_rules.check_manage(principal("default", platform=True), "-", "ListKeys")
    with pytest.raises(PermissionDenied, match="admin role"):
        key_rules.check_manage(principal(role=Role.OPERATOR), "acme", "CreateKey")
    with pytest.raises(PermissionDenied, match="only its keys"):
        key_rules.check_manage(principal(), "beta", "ListKeys")
    with pytest.raises(PermissionDenied):
        key_rules.check_manage(principal(), "-", "ListKeys")


def test_no_one_grants_a_role_above_their_own_or_platform_administration() -> None:
    spec = KeySpec("acme", "", Role.ADMIN)
    key_rules.check_grant(principal(), spec)
    key_rules.check_grant(principal(platform=True), replace(spec, platform_admin=True))
    with pytest.raises(PermissionDenied, match="above the role"):
        key_rules.check_grant(principal(role=Role.OPERATOR), spec)
    with pytest.raises(PermissionDenied, match="platform administrator"):
        key_rules.check_grant(principal(), replace(spec, platform_admin=True))


def test_revoke_names_a_key_by_id_by_resource_name_or_by_display_name() -> None:
    key_id = "abcdefgh234567ab"
    assert key_rules.key_lookup(key_id) == key_rules.KeyLookup(id=key_id)
    assert key_rules.key_lookup(f"keys/{key_id}") == key_rules.KeyLookup(id=key_id)
    assert key_rules.key_lookup("ci-deploy") == key_rules.KeyLookup(display_name="ci-deploy")
    for bad in ("", "keys/nope", "crl_" + key_id + "_x", "two words"):
        with pytest.raises(InvalidArgument):
            key_rules.key_lookup(bad)
    missing = key_rules.key_not_found(key_rules.KeyLookup(display_name="ci"), "acme")
    assert type(missing) is NotFound
    assert "'ci'" in missing.message


def test_a_revoked_or_expired_key_is_refused_naming_why() -> None:
    assert key_rules.refusal(record(), T0) is None
    assert key_rules.refusal(record(expire_time=T0 + timedelta(seconds=1)), T0) is None
    expired = key_rules.refusal(record(expire_time=T0), T0)
    assert expired is not None and expired.reason == "API_KEY_EXPIRED" and "'ci'" in expired.message
    revoked = key_rules.refusal(record(revoke_time=T0, expire_time=T0), T0)
    assert revoked is not None and revoked.reason == "API_KEY_REVOKED"


def test_a_keys_use_is_written_at_most_once_a_minute() -> None:
    assert key_rules.use_due(None, T0)
    assert not key_rules.use_due(T0, T0 + timedelta(seconds=59))
    assert key_rules.use_due(T0, T0 + timedelta(seconds=60))


def test_a_keys_principal_is_its_tenant_and_role() -> None:
    p = record(platform_admin=True).principal()
    assert (p.tenant, p.subject, p.roles, p.kind, p.credential, p.platform_admin) == (
        "acme", "key:ci", frozenset({Role.OPERATOR}), CredentialKind.API_KEY, "a" * 16, True)


# -- the verifier cache --------------------------------------------------------------------------


class CountingVerifier:
    """Verifies "good-*" credentials, refuses the rest; "down" as if the registry were away."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def verify(self, credential: str) -> Principal:
        self.calls.append(credential)
        if credential == "down":
            raise Unavailable("registry unreachable")
        if credential.startswith("good"):
            return principal(subject_of(credential))
        raise Unauthenticated(f"API key refused ({len(self.calls)})", reason="API_KEY_REVOKED")


def subject_of(credential: str) -> str:
    return credential.removeprefix("good-") or "acme"


async def test_the_cache_reuses_answers_and_refusals_for_its_ttl_only() -> None:
    inner, now = CountingVerifier(), [0.0]
    cached = CachedKeyVerifier(inner, ttl_s=5, monotonic=lambda: now[0])
    first = await cached.verify("good")
    for _ in range(3):
        assert await cached.verify("good") == first
        with pytest.raises(Unauthenticated) as refused:
            await cached.verify("bad")
        assert refused.value.reason == "API_KEY_REVOKED" and "(2)" in refused.value.message
    assert inner.calls == ["good", "bad"]
    now[0] = 5.0
    await cached.verify("good")
    with pytest.raises(Unauthenticated):
        await cached.verify("bad")
    assert inner.calls == ["good", "bad", "good", "bad"]


async def test_calls_that_arrive_together_share_one_question_to_the_registry() -> None:
    inner, release = CountingVerifier(), asyncio.Event()
    slow = inner.verify

    async def waits(credential: str) -> Principal:
        await release.wait()
        return await slow(credential)

    inner.verify = waits  # type: ignore[method-assign]
    cached = CachedKeyVerifier(inner, ttl_s=5, monotonic=lambda: 0.0)
    calls = [asyncio.create_task(cached.verify(c)) for c in ("good", "good", "bad", "bad")]
    await asyncio.sleep(0)
    release.set()
    answers = await asyncio.gather(*calls, return_exceptions=True)
    assert answers[0] == answers[1] and isinstance(answers[0], Principal)
    assert all(isinstance(a, Unauthenticated) for a in answers[2:])
    assert sorted(inner.calls) == ["bad", "good"]


async def test_the_cache_does_not_remember_an_unreachable_registry() -> None:
    inner = CountingVerifier()
    cached = CachedKeyVerifier(inner, ttl_s=5, monotonic=lambda: 0.0)
    for _ in range(2):
        with pytest.raises(Unavailable):
            await cached.verify("down")
    assert inner.calls == ["down", "down"]


async def test_the_cache_is_bounded_dropping_the_least_recently_used() -> None:
    inner = CountingVerifier()
    cached = CachedKeyVerifier(inner, ttl_s=60, max_entries=2, monotonic=lambda: 0.0)
    for credential in ("good-a", "good-b", "good-a", "good-c"):
        await cached.verify(credential)
    assert inner.calls == ["good-a", "good-b", "good-c"]
    await cached.verify("good-a")  # kept: used more recently than b
    await cached.verify("good-b")  # dropped for c
    assert inner.calls == ["good-a", "good-b", "good-c", "good-b"]


# -- the client's credential ---------------------------------------------------------------------


def _admin_key(tmp_path: Path) -> str:
    key = str(apikeys.new_key())
    (tmp_path / "admin.key").write_text(key + "\n")
    return key


def test_a_local_platform_is_called_with_the_bootstrapped_admin_key(tmp_path: Path) -> None:
    key = _admin_key(tmp_path)
    env = {"CORRAL_DATA_DIR": str(tmp_path)}
    assert ClientConfig.from_env(env).credential == key
    # Given a credential, the client uses it, never the file.
    assert ClientConfig.from_env({**env, "CORRAL_API_KEY": "crl_mine"}).credential == "crl_mine"
    assert ClientConfig.from_env({**env, "CORRAL_TOKEN": "a.b.c"}).credential == "a.b.c"
    assert ClientConfig.from_env({**env, "CORRAL_TOKEN": "a.b.c"}, api_key="crl_flag").credential == "crl_flag"
    # A platform elsewhere never gets this machine's administrator key.
    remote = {**env, "CORRAL_ROUTER_ADDR": "corral.example.com:443"}
    assert ClientConfig.from_env(remote).credential == ""
    assert ClientConfig.from_env({"CORRAL_DATA_DIR": str(tmp_path / "none")}).credential == ""


def test_an_api_key_and_a_token_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="not both"):
        ClientConfig.from_env({"CORRAL_API_KEY": "crl_x", "CORRAL_TOKEN": "a.b.c"})


def test_the_credential_is_not_in_the_configs_repr(tmp_path: Path) -> None:
    key = _admin_key(tmp_path)
    assert key not in repr(ClientConfig.from_env({"CORRAL_DATA_DIR": str(tmp_path)}))


@pytest.mark.parametrize(("address", "local"), [
    ("127.0.0.1:50051", True), ("localhost:1", True), ("[::1]:50051", True), ("127.8.0.1:9", True),
    ("10.0.0.1:50051", False), ("corral.example.com:443", False), ("0.0.0.0:50051", False),
])
def test_loopback_addresses(address: str, local: bool) -> None:
    assert is_loopback(address) is local
