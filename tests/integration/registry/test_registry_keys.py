"""API keys on a real registry and PostgreSQL: made, listed, revoked and verified over gRPC, kept
apart per tenant; expiry, last use and the platform administrator's bootstrap key through the
keys domain on the same store with a clock the test moves; and the verifiers other services use."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
import pytest_asyncio
from click.testing import CliRunner
from google.protobuf import duration_pb2, timestamp_pb2

from corral.cli import State, cli
from corral.client import CorralClient
from corral.config import DEFAULT_ADDRS, ClientConfig
from corral.identity.v1 import identity_pb2, identity_pb2_grpc
from corral.registry.v1 import keys_pb2 as pb
from corral.registry.v1 import keys_pb2_grpc
from services.common.auth.apikeys import parse_key
from services.common.auth.key_client import CachedKeyVerifier, RemoteKeyVerifier
from services.common.auth.principal import CredentialKind, Principal, Role
from services.common.errors import NotFound, PermissionDenied, Unauthenticated
from services.common.settings import Settings
from services.registry.bootstrap import ensure_admin_key
from services.registry.key_model import KeyDraft
from services.registry.key_rules import key_lookup
from services.registry.keys import Keys
from services.registry.store import PgStore
from tests import harness
from tests.credentials import internal_channel, public_channel, token
from tests.fakes.common import T0, FakeClock
from tests.rpc import Metadata, error_details, fails, new_tenant, who

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@dataclass
class KeyRegistry:
    settings: Settings
    # The public port, and the internal listener as the router (VerifyKey is for services only).
    stub: keys_pb2_grpc.KeyServiceAsyncStub
    internal: keys_pb2_grpc.KeyServiceAsyncStub
    whoami: identity_pb2_grpc.IdentityServiceAsyncStub
    tenant: str
    md: Metadata

    async def create(self, name: str = "", role: int = pb.KEY_ROLE_INVOKER, **fields: object
                     ) -> pb.CreateKeyResponse:
        key = pb.Key(display_name=name, role=role, **fields)  # type: ignore[arg-type]
        return await self.stub.CreateKey(pb.CreateKeyRequest(key=key), metadata=self.md)

    async def listed(self, **fields: object) -> list[str]:
        request = pb.ListKeysRequest(**fields)  # type: ignore[arg-type]
        return [k.display_name for k in (await self.stub.ListKeys(request, metadata=self.md)).keys]

    async def verify(self, api_key: str) -> pb.VerifyKeyResponse:
        return await self.internal.VerifyKey(pb.VerifyKeyRequest(api_key=api_key))


def presenting(api_key: str) -> Metadata:
    return (("authorization", f"Bearer {api_key}"),)


# Short, so that a test sees a revoked key refused without waiting long.
CACHE_S = 0.3


@pytest_asyncio.fixture
async def registry(settings: Settings) -> AsyncIterator[KeyRegistry]:
    """A real registry; a tenant of its own, whose admin (a token from the run's identity
    provider) the test acts as, keeps each test apart."""
    platform = await harness.start_mesh(replace(settings, credential_cache_s=CACHE_S), "registry")
    try:
        async with (
            public_channel(platform.settings.addrs["registry"]) as channel,
            internal_channel(platform.settings, "registry", "router") as internal,
        ):
            tenant = new_tenant()
            yield KeyRegistry(platform.settings, keys_pb2_grpc.KeyServiceStub(channel),
                              keys_pb2_grpc.KeyServiceStub(internal),
                              identity_pb2_grpc.IdentityServiceStub(channel), tenant, who(tenant))
    finally:
        await platform.stop()


@pytest_asyncio.fixture
async def store(registry: KeyRegistry) -> AsyncIterator[PgStore]:
    """The registry's store on the database it migrated."""
    url = registry.settings.database_url
    assert url is not None
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    assert pool is not None
    try:
        yield PgStore(pool)
    finally:
        await pool.close()


def admin(tenant: str, *, role: Role = Role.ADMIN, platform: bool = False) -> Principal:
    return Principal(tenant=tenant, subject="ada", roles=frozenset({role}),
                     kind=CredentialKind.API_KEY, credential="k", platform_admin=platform)


# -- over gRPC -------------------------------------------------------------------------------


async def test_a_key_is_shown_once_listed_without_its_secret_and_proves_its_principal(
    registry: KeyRegistry,
) -> None:
    made = await registry.create("ci", pb.KEY_ROLE_OPERATOR)
    key = parse_key(made.api_key)
    assert made.key.name == f"keys/{key.id}" and made.key.key_id == key.id
    assert (made.key.tenant, made.key.display_name, made.key.role) == (
        registry.tenant, "ci", pb.KEY_ROLE_OPERATOR)
    assert not made.key.HasField("expire_time") and not made.key.HasField("revoke_time")

    listing = await registry.stub.ListKeys(pb.ListKeysRequest(), metadata=registry.md)
    assert [k.name for k in listing.keys] == [made.key.name]
    assert key.secret not in str(listing), "a listing never carries a secret"

    proved = await registry.verify(made.api_key)
    assert (proved.tenant, proved.subject, list(proved.roles), proved.key_id) == (
        registry.tenant, "key:ci", [pb.KEY_ROLE_OPERATOR], key.id)
    assert not proved.platform_admin


async def test_names_are_generated_when_empty_and_unique_among_live_keys(
    registry: KeyRegistry,
) -> None:
    unnamed = await registry.create()
    assert unnamed.key.display_name == f"key-{unnamed.key.key_id}"
    await registry.create("deploy")
    err = await fails(grpc.StatusCode.ALREADY_EXISTS, registry.create("deploy"))
    assert "deploy" in (err.details() or "")
    await registry.stub.RevokeKey(pb.RevokeKeyRequest(name="deploy"), metadata=registry.md)
    await registry.create("deploy")  # the name is free again once its key is revoked
    assert sorted(await registry.listed()) == sorted([unnamed.key.display_name, "deploy"])
    assert len(await registry.listed(show_revoked=True)) == 3


async def test_a_revoked_key_is_refused_naming_why_and_revoking_again_changes_nothing(
    registry: KeyRegistry,
) -> None:
    made = await registry.create("laptop")
    revoked = await registry.stub.RevokeKey(
        pb.RevokeKeyRequest(name=made.key.key_id), metadata=registry.md)
    assert revoked.HasField("revoke_time")
    err = await fails(grpc.StatusCode.UNAUTHENTICATED, registry.verify(made.api_key))
    assert error_details(err)[0].reason == "API_KEY_REVOKED" and "laptop" in (err.details() or "")
    again = await registry.stub.RevokeKey(pb.RevokeKeyRequest(name=made.key.name),
                                          metadata=registry.md)
    assert again.revoke_time == revoked.revoke_time


@pytest.mark.parametrize(("credential", "reason"), [
    ("", "API_KEY_MALFORMED"),
    ("crl_short_secret", "API_KEY_MALFORMED"),
    ("eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "API_KEY_MALFORMED"),
    ("crl_" + "a" * 16 + "_" + "b" * 52, "API_KEY_UNKNOWN"),
])
async def test_a_key_that_is_not_one_of_ours_is_unauthenticated(
    registry: KeyRegistry, credential: str, reason: str
) -> None:
    err = await fails(grpc.StatusCode.UNAUTHENTICATED, registry.verify(credential))
    assert error_details(err)[0].reason == reason


async def test_a_right_id_with_a_wrong_secret_is_unknown(registry: KeyRegistry) -> None:
    made = await registry.create()
    forged = f"crl_{made.key.key_id}_{'a' * 52}"
    err = await fails(grpc.StatusCode.UNAUTHENTICATED, registry.verify(forged))
    assert error_details(err)[0].reason == "API_KEY_UNKNOWN"


async def test_another_tenants_keys_cannot_be_seen_or_revoked(registry: KeyRegistry) -> None:
    made = await registry.create("theirs")
    other = who(new_tenant())
    for name in (made.key.key_id, made.key.name, "theirs"):
        await fails(grpc.StatusCode.NOT_FOUND, registry.stub.RevokeKey(
            pb.RevokeKeyRequest(name=name), metadata=other))
    err = await fails(grpc.StatusCode.NOT_FOUND, registry.stub.RevokeKey(
        pb.RevokeKeyRequest(name="theirs", tenant=registry.tenant), metadata=other))
    assert "theirs" in (err.details() or "")
    await fails(grpc.StatusCode.PERMISSION_DENIED, registry.stub.ListKeys(
        pb.ListKeysRequest(tenant=registry.tenant), metadata=other))
    await fails(grpc.StatusCode.PERMISSION_DENIED, registry.stub.ListKeys(
        pb.ListKeysRequest(tenant="-"), metadata=other))
    await fails(grpc.StatusCode.PERMISSION_DENIED, registry.stub.CreateKey(
        pb.CreateKeyRequest(tenant=registry.tenant, key=pb.Key(role=pb.KEY_ROLE_ADMIN)),
        metadata=other))
    assert await registry.listed() == ["theirs"]
    await registry.verify(made.api_key)  # still valid


@pytest.mark.parametrize(("key", "field"), [
    (pb.Key(), "key.role"),
    (pb.Key(role=pb.KEY_ROLE_VIEWER, display_name="no spaces"), "key.display_name"),
    (pb.Key(role=pb.KEY_ROLE_VIEWER, ttl=duration_pb2.Duration(seconds=-5)), "key.ttl"),
    (pb.Key(role=pb.KEY_ROLE_VIEWER, expire_time=timestamp_pb2.Timestamp(seconds=1)), "key.expire_time"),
])
async def test_bad_input_names_its_field(registry: KeyRegistry, key: pb.Key, field: str) -> None:
    err = await fails(grpc.StatusCode.INVALID_ARGUMENT, registry.stub.CreateKey(
        pb.CreateKeyRequest(key=key), metadata=registry.md))
    assert error_details(err)[1] == [field]


async def test_listing_pages_oldest_first(registry: KeyRegistry) -> None:
    for name in ("k1", "k2", "k3"):
        await registry.create(name)
    first = await registry.stub.ListKeys(pb.ListKeysRequest(page_size=2), metadata=registry.md)
    rest = await registry.stub.ListKeys(
        pb.ListKeysRequest(page_size=2, page_token=first.next_page_token), metadata=registry.md)
    assert [k.display_name for k in (*first.keys, *rest.keys)] == ["k1", "k2", "k3"]
    assert not rest.next_page_token


async def test_a_ttl_becomes_an_expire_time_that_verify_reports(registry: KeyRegistry) -> None:
    made = await registry.create("brief", ttl=duration_pb2.Duration(seconds=3600))
    expires = made.key.expire_time.ToDatetime(tzinfo=UTC)
    assert timedelta(minutes=59) < expires - datetime.now(UTC) <= timedelta(hours=1)
    assert (await registry.verify(made.api_key)).expire_time == made.key.expire_time


# -- keys as credentials -----------------------------------------------------------------------


async def test_a_key_is_a_credential_whose_role_bounds_what_it_may_do(
    registry: KeyRegistry,
) -> None:
    operator = await registry.create("deployer", pb.KEY_ROLE_OPERATOR)
    me = await registry.whoami.WhoAmI(identity_pb2.WhoAmIRequest(),
                                      metadata=presenting(operator.api_key))
    assert (me.tenant, me.subject, list(me.roles), me.credential_kind, me.credential) == (
        registry.tenant, "key:deployer", ["operator"], "api_key", operator.key.key_id)
    # Keys are an admin's business: the table refuses an operator's key before the servicer.
    await fails(grpc.StatusCode.PERMISSION_DENIED, registry.stub.ListKeys(
        pb.ListKeysRequest(), metadata=presenting(operator.api_key)))
    admin_key = await registry.create("keeper", pb.KEY_ROLE_ADMIN)
    listing = await registry.stub.ListKeys(pb.ListKeysRequest(),
                                           metadata=presenting(admin_key.api_key))
    assert {k.display_name for k in listing.keys} == {"deployer", "keeper"}
    # Headers naming another tenant change nothing for a key's caller.
    forged = (*presenting(admin_key.api_key), ("x-corral-tenant", new_tenant()))
    made = await registry.stub.CreateKey(pb.CreateKeyRequest(key=pb.Key(role=pb.KEY_ROLE_VIEWER)),
                                         metadata=forged)
    assert made.key.tenant == registry.tenant


async def test_a_revoked_key_is_refused_on_the_public_port_within_the_cache_time(
    registry: KeyRegistry,
) -> None:
    made = await registry.create("soon-gone", pb.KEY_ROLE_VIEWER)
    call = identity_pb2.WhoAmIRequest()
    await registry.whoami.WhoAmI(call, metadata=presenting(made.api_key))
    await registry.stub.RevokeKey(pb.RevokeKeyRequest(name="soon-gone"), metadata=registry.md)
    await asyncio.sleep(CACHE_S + 0.1)
    err = await fails(grpc.StatusCode.UNAUTHENTICATED, registry.whoami.WhoAmI(
        call, metadata=presenting(made.api_key)))
    assert "revoked" in (err.details() or "")
    await fails(grpc.StatusCode.UNAUTHENTICATED, registry.whoami.WhoAmI(
        call, metadata=presenting(made.api_key[:-1] + "a")))


async def test_another_service_accepts_keys_through_the_registry(registry: KeyRegistry) -> None:
    platform = harness.Platform(registry.settings)
    await platform.start("router")  # after the registry, so it knows where to ask
    try:
        made = await registry.create("at-the-router", pb.KEY_ROLE_INVOKER)
        async with grpc.aio.insecure_channel(platform.settings.addrs["router"]) as channel:
            router = identity_pb2_grpc.IdentityServiceStub(channel)
            me = await router.WhoAmI(identity_pb2.WhoAmIRequest(),
                                     metadata=presenting(made.api_key))
            assert (me.tenant, me.subject) == (registry.tenant, "key:at-the-router")
            await registry.stub.RevokeKey(pb.RevokeKeyRequest(name=made.key.key_id),
                                          metadata=registry.md)
            await asyncio.sleep(CACHE_S + 0.1)
            await fails(grpc.StatusCode.UNAUTHENTICATED, router.WhoAmI(
                identity_pb2.WhoAmIRequest(), metadata=presenting(made.api_key)))
    finally:
        await platform.stop()


async def test_verify_key_is_for_services_only(registry: KeyRegistry) -> None:
    made = await registry.create()
    await fails(grpc.StatusCode.PERMISSION_DENIED, registry.stub.VerifyKey(
        pb.VerifyKeyRequest(api_key=made.api_key), metadata=presenting(made.api_key)))


# -- the domain on the same store, with a clock the test moves ----------------------------------


async def test_expired_keys_are_refused_and_free_their_name(store: PgStore) -> None:
    clock, tenant = FakeClock(), new_tenant()
    keys = Keys(store, clock)
    record, key = await keys.create(admin(tenant), KeyDraft(
        display_name="night", role=Role.VIEWER, ttl=timedelta(hours=1)))
    assert (await keys.verify(str(key))).roles == frozenset({Role.VIEWER})
    clock.advance(3600)
    with pytest.raises(Unauthenticated) as refused:
        await keys.verify(str(key))
    assert refused.value.reason == "API_KEY_EXPIRED" and "night" in refused.value.message
    # An expired key holds its name no longer: a new key takes it, the old one is revoked.
    await keys.create(admin(tenant), KeyDraft(display_name="night", role=Role.VIEWER))
    old = await store.get_key(record.id)
    assert old is not None and old.revoke_time == clock.now()


async def test_last_use_is_written_at_most_once_a_minute(store: PgStore) -> None:
    clock = FakeClock()
    keys = Keys(store, clock)
    record, key = await keys.create(admin(new_tenant()), KeyDraft(role=Role.INVOKER))
    assert record.last_use_time is None

    async def last_use() -> datetime | None:
        found = await store.get_key(record.id)
        assert found is not None
        return found.last_use_time

    await keys.verify(str(key))
    assert await last_use() == T0
    clock.advance(59)
    await keys.verify(str(key))
    assert await last_use() == T0, "not written again within the minute"
    clock.advance(1)
    await keys.verify(str(key))
    assert await last_use() == T0 + timedelta(seconds=60)


async def test_no_one_grants_more_than_they_hold(store: PgStore) -> None:
    tenant = new_tenant()
    keys = Keys(store, FakeClock())
    operator = admin(tenant, role=Role.OPERATOR)
    with pytest.raises(PermissionDenied, match="admin role"):
        await keys.create(operator, KeyDraft(role=Role.VIEWER))
    # An admin of the tenant may not mint a platform administrator, nor act in another tenant.
    with pytest.raises(PermissionDenied, match="platform administrator"):
        await keys.create(admin(tenant), KeyDraft(role=Role.VIEWER, platform_admin=True))
    with pytest.raises(PermissionDenied, match="may manage only"):
        await keys.create(admin(tenant), KeyDraft(tenant=new_tenant(), role=Role.VIEWER))
    # A platform administrator may do both.
    other = new_tenant()
    record, _ = await keys.create(admin("default", platform=True),
                                  KeyDraft(tenant=other, role=Role.ADMIN, platform_admin=True))
    assert (record.tenant, record.platform_admin) == (other, True)
    # And revoke another tenant's key by its id alone; a tenant's admin may not.
    with pytest.raises(NotFound):
        await keys.revoke(admin(tenant), "", key_lookup(record.id))
    with pytest.raises(NotFound):
        await keys.revoke(admin(tenant), other, key_lookup(record.id))
    revoked = await keys.revoke(admin("default", platform=True), "", key_lookup(record.id))
    assert revoked.revoke_time is not None


async def test_the_bootstrap_key_is_written_private_kept_while_valid_and_remade_when_not(
    store: PgStore, tmp_path: Path
) -> None:
    keys = Keys(store)
    path = tmp_path / "data" / "admin.key"
    await ensure_admin_key(keys, path)
    first = path.read_text().strip()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    principal = await keys.verify(first)
    assert (principal.tenant, principal.platform_admin, principal.roles) == (
        "default", True, frozenset({Role.ADMIN}))

    await ensure_admin_key(keys, path)
    assert path.read_text().strip() == first, "a valid key is kept"

    await keys.revoke(principal, "default", key_lookup("bootstrap-admin"))
    await ensure_admin_key(keys, path)
    second = path.read_text().strip()
    assert second != first and (await keys.verify(second)).platform_admin

    path.write_text("not a key\n")
    await ensure_admin_key(keys, path)
    third = path.read_text().strip()
    assert third != second and (await keys.verify(third)).platform_admin
    with pytest.raises(Unauthenticated, match="revoked"):
        await keys.verify(second)  # the lost file's key does not stay valid
    assert not list(path.parent.glob(".admin.key.*")), "no temporary file is left behind"


async def test_a_registry_given_a_bootstrap_file_makes_the_key_at_start(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "admin.key"
    settings = harness.make_settings(database_url, redis_url, tmp_path,
                                     CORRAL_BOOTSTRAP_ADMIN_KEY_FILE=str(path))
    platform = await harness.start_mesh(settings, "registry")
    try:
        admin_key = path.read_text().strip()
        async with grpc.aio.insecure_channel(platform.settings.addrs["registry"]) as channel:
            stub = keys_pb2_grpc.KeyServiceStub(channel)
            me = await identity_pb2_grpc.IdentityServiceStub(channel).WhoAmI(
                identity_pb2.WhoAmIRequest(), metadata=presenting(admin_key))
            assert (me.tenant, me.subject, me.platform_admin) == (
                "default", "key:bootstrap-admin", True)
            # A platform administrator manages every tenant's keys; a tenant's admin only its own.
            elsewhere = new_tenant()
            await stub.CreateKey(pb.CreateKeyRequest(tenant=elsewhere, key=pb.Key(
                display_name="theirs", role=pb.KEY_ROLE_ADMIN)), metadata=presenting(admin_key))
            every = await stub.ListKeys(pb.ListKeysRequest(tenant="-", page_size=1000),
                                        metadata=presenting(admin_key))
            assert {(k.tenant, k.display_name) for k in every.keys} >= {
                ("default", "bootstrap-admin"), (elsewhere, "theirs")}
            await fails(grpc.StatusCode.PERMISSION_DENIED, stub.ListKeys(
                pb.ListKeysRequest(tenant="-"), metadata=who(elsewhere)))
    finally:
        await platform.stop()


# -- the verifiers of the other services --------------------------------------------------------


async def test_other_services_verify_through_the_registry_and_cache_for_a_bounded_time(
    registry: KeyRegistry,
) -> None:
    made = await registry.create("cached", pb.KEY_ROLE_VIEWER)
    remote = RemoteKeyVerifier(registry.settings.for_service("router"))
    now = [0.0]
    cached = CachedKeyVerifier(remote, ttl_s=5, monotonic=lambda: now[0])
    try:
        principal = await cached.verify(made.api_key)
        assert (principal.tenant, principal.subject, principal.roles, principal.credential) == (
            registry.tenant, "key:cached", frozenset({Role.VIEWER}), made.key.key_id)
        await registry.stub.RevokeKey(pb.RevokeKeyRequest(name="cached"), metadata=registry.md)
        now[0] = 4.9
        assert await cached.verify(made.api_key) == principal, "honoured until the entry expires"
        now[0] = 5.0
        with pytest.raises(Unauthenticated, match="revoked"):
            await cached.verify(made.api_key)
        with pytest.raises(Unauthenticated, match="revoked"):
            await remote.verify(made.api_key)
    finally:
        await remote.close()



# -- the corral command against the real registry ----------------------------------------------


async def test_the_corral_command_creates_lists_and_revokes_keys(registry: KeyRegistry) -> None:
    addrs = {**DEFAULT_ADDRS, "registry": registry.settings.addrs["registry"]}
    client = CorralClient(ClientConfig(addrs=addrs,
                                       credential=token(registry.tenant)))

    def corral(*args: str) -> object:
        result = CliRunner().invoke(cli, ["--json", *args], obj=State(client=client))
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    try:
        # The command's client is synchronous: it runs beside the server's event loop.
        me = await asyncio.to_thread(corral, "whoami")
        assert isinstance(me, dict)
        assert (me["tenant"], me["credential_kind"], me["roles"]) == (registry.tenant, "jwt", ["admin"])
        made = await asyncio.to_thread(corral, "keys", "create", "--role", "viewer", "--name",
                                       "from-cli", "--expires", "30m")
        assert isinstance(made, dict)
        proved = await registry.verify(made["key"])
        assert (proved.tenant, proved.subject) == (registry.tenant, "key:from-cli")
        listed = await asyncio.to_thread(corral, "keys", "list")
        assert isinstance(listed, list) and [k["display_name"] for k in listed] == ["from-cli"]
        await asyncio.to_thread(corral, "keys", "revoke", "from-cli")
        await fails(grpc.StatusCode.UNAUTHENTICATED, registry.verify(made["key"]))
    finally:
        client.close()
