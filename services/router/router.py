"""The router's domain: which version serves a session, and forwarding the invocation."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from corral import names
from corral.executor.v1 import executor_pb2
from corral.sessions.v1 import sessions_pb2
from services.common.endpoints import EndpointMirror, EndpointTraffic
from services.common.errors import (
    CorralError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
)
from services.common.identity import Caller
from services.router.routing import bucket, choose
from services.router.store import Clients, PinCache

log = logging.getLogger(__name__)
DEFAULT_ENDPOINT = "DEFAULT"


@dataclass(frozen=True)
class Target:
    agent: str
    endpoint: str = ""
    version: str = ""
    session_id: str = ""


@dataclass(frozen=True)
class Resolved:
    session: str
    version: str
    digest: str
    endpoint: str
    new_session: bool


def _parse_target(target: Target) -> tuple[str, str, str]:
    """(agent id, endpoint id, version name) from what the caller sent, checked."""
    try:
        agent = names.parse_agent(target.agent)
    except names.ResourceNameError as exc:
        raise InvalidArgument.field("agent", str(exc)) from None
    version = ""
    if target.version:
        raw = target.version
        version = names.version_name(agent, int(raw)) if raw.isdigit() and int(raw) > 0 else raw
        try:
            ref = names.parse_version(version)
        except names.ResourceNameError as exc:
            raise InvalidArgument.field("version", str(exc)) from None
        if ref.agent != agent:
            raise InvalidArgument.field("version", f"{version} is not a version of {target.agent}")
    endpoint = target.endpoint or ("" if version else DEFAULT_ENDPOINT)
    if endpoint and not names.valid_endpoint_id(endpoint):
        raise InvalidArgument.field("endpoint", f"{endpoint!r} is not an endpoint id")
    if target.session_id and not names.valid_session_id(target.session_id):
        raise InvalidArgument.field(
            "session_id", f"{target.session_id!r}: use 1-128 letters, digits, '.', '_', ':' or '-'"
        )
    return agent, endpoint, version


class Router:
    def __init__(self, clients: Clients, endpoints: EndpointMirror, max_payload_bytes: int) -> None:
        self.clients = clients
        self.endpoints = endpoints
        self.pins = PinCache()
        self.max_payload_bytes = max_payload_bytes

    async def resolve(self, caller: Caller, target: Target) -> Resolved:
        agent, endpoint, version = _parse_target(target)
        session_id = target.session_id or uuid.uuid4().hex
        name = names.session_name(session_id)
        pin = self.pins.get(name) if target.session_id else None
        if pin is not None and (pin.tenant, pin.user) != (caller.tenant, caller.user):
            raise PermissionDenied(f"{name} belongs to another caller")
        if pin is not None and self._maybe_retired(pin):
            # Its version no longer takes new sessions here: a rollback may have migrated or
            # stopped it, so read the session again rather than trust the cached pin.
            pin = await self.clients.get_session(caller, name)
        if pin is None:
            # Not pinned here: most often a new session, so it is created straight away; one that
            # exists already (started through another router) is refused by the create and read.
            # That saves a new session a round trip to sessions.
            try:
                created = await self._create(caller, session_id, agent, endpoint, version)
            except (CorralError, grpc.aio.AioRpcError):
                # Nothing to create it from (an endpoint or version that is not there): a session
                # that exists needs neither, so its pin decides.
                if not target.session_id or (pin := await self.clients.get_session(caller, name)) is None:
                    raise
            else:
                if created is not None:
                    return created
                pin = await self.clients.get_session(caller, name)
                if pin is None:
                    raise FailedPrecondition(f"{name} vanished while it was being created; retry")
        if pin.agent != names.agent_name(agent):
            raise FailedPrecondition(
                f"{name} belongs to {pin.agent}, not agents/{agent}; use another session id",
                reason="SESSION_AGENT_MISMATCH",
            )
        if pin.status in (sessions_pb2.SESSION_STATUS_STOPPED, sessions_pb2.SESSION_STATUS_EXPIRED):
            self.pins.forget(name)
            state = sessions_pb2.SessionStatus.Name(pin.status).removeprefix("SESSION_STATUS_").lower()
            raise FailedPrecondition(f"{name} is {state}; start a new session", reason="SESSION_ENDED")
        self.pins.put(pin)
        return Resolved(name, pin.version, pin.version_digest, pin.endpoint, False)

    async def _create(
        self, caller: Caller, session_id: str, agent: str, endpoint: str, version: str
    ) -> Resolved | None:
        """Creates the session, pinned to `version` or to what `endpoint` chooses for it; None
        when a session with that id exists already."""
        if version:
            digest = await self.clients.version_digest(version)
            endpoint_name = ""
        else:
            view = await self.endpoints.get(names.EndpointRef(agent, endpoint))
            number = choose(view.shares, bucket(view.salt, session_id))
            version = names.version_name(agent, number)
            digest = await self.clients.version_digest(version)
            endpoint_name = names.endpoint_name(agent, endpoint)
        created = await self.clients.create_session(
            caller, session_id, agent, version, digest, endpoint_name
        )
        if created is None:
            return None
        self.pins.put(created)
        return Resolved(names.session_name(session_id), version, digest, endpoint_name, True)

    def _maybe_retired(self, pin: sessions_pb2.Session) -> bool:
        if not pin.endpoint:
            return False
        try:
            agent, endpoint = names.parse_endpoint(pin.endpoint)
            number = names.parse_version(pin.version).number
        except names.ResourceNameError:
            return False
        view = self.endpoints.cached(names.EndpointRef(agent, endpoint))
        return view is not None and not view.routes_to(number)

    def cached_endpoint(self, name: str) -> tuple[EndpointTraffic | None, bool]:
        try:
            agent, endpoint = names.parse_endpoint(name)
        except names.ResourceNameError as exc:
            raise InvalidArgument.field("name", str(exc)) from None
        return self.endpoints.cached(names.EndpointRef(agent, endpoint)), self.endpoints.synced.is_set()

    def check_payload(self, payload: bytes) -> None:
        if not payload:
            raise InvalidArgument.field("payload", "is empty; send a request body such as {}")
        if len(payload) > self.max_payload_bytes:
            raise InvalidArgument.field(
                "payload", f"{len(payload)} bytes is over the {self.max_payload_bytes}-byte limit"
            )

    async def invoke(
        self, caller: Caller, target: Target, payload: bytes, content_type: str,
        trace_metadata: tuple[tuple[str, str], ...],
    ) -> AsyncIterator[tuple[Resolved, executor_pb2.ExecuteResponse]]:
        self.check_payload(payload)
        resolved = await self.resolve(caller, target)
        request = executor_pb2.ExecuteRequest(
            session=resolved.session, version=resolved.version, digest=resolved.digest,
            endpoint=resolved.endpoint, invocation_id=uuid.uuid4().hex, payload=payload,
            content_type=content_type or "application/json", tenant=caller.tenant, user=caller.user,
        )
        call = self.clients.execute(caller, request, trace_metadata)
        try:
            async for response in call:
                yield resolved, response
        finally:
            # When the caller goes away the execution must end too, rather than run on (and
            # commit its turn) until the call object is garbage-collected.
            call.cancel()  # type: ignore[attr-defined]

    async def stop_session(self, caller: Caller, session: str) -> None:
        try:
            names.parse_session(session)
        except names.ResourceNameError as exc:
            raise InvalidArgument.field("name", str(exc)) from None
        await self.clients.stop_session(caller, session)
        self.pins.forget(session)
