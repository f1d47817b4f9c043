"""Helpers for tests of the executor fleet: heartbeats as an executor sends them, and a platform
administrator's credential (who alone may list and drain the fleet)."""

from __future__ import annotations

from datetime import UTC, datetime

from corral.sessions.v1 import fleet_pb2
from services.common.auth.assertions import ASSERTION_KEY, AssertionSigner
from services.common.auth.pki import load_identity
from services.common.auth.principal import CredentialKind, Principal, Role
from services.common.settings import Settings
from tests.rpc import Metadata


def beat(
    name: str, *, address: str = "127.0.0.1:1", capacity: int = 8, in_use: int = 0,
    warm: tuple[str, ...] = (),
) -> fleet_pb2.HeartbeatRequest:
    executor = fleet_pb2.Executor(
        name=f"executors/{name}", address=address, instance_id="i-" + name, driver="process",
        capacity=capacity, sandboxes_in_use=in_use, warm_versions=list(warm),
    )
    executor.start_time.FromDatetime(datetime.now(UTC))
    return fleet_pb2.HeartbeatRequest(executor=executor)


def platform_admin(settings: Settings) -> Metadata:
    """A platform administrator's call, as a service relays it (use an internal channel)."""
    admin = Principal(
        "ops", "root", frozenset({Role.ADMIN}), kind=CredentialKind.API_KEY, credential="k",
        platform_admin=True,
    )
    signer = AssertionSigner(load_identity(settings.pki_dir, "router"))
    return ((ASSERTION_KEY, signer.sign(admin)),)
