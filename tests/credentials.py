"""Credentials for the tests, as real as a deployment's: a local identity provider (a key pair and
a JWKS served on loopback) whose tokens every service started by the tests accepts, and the
service certificates of the run for calls that only a service may make."""

from __future__ import annotations

import atexit
import functools
import json
from collections.abc import Callable
from typing import Any

import grpc
import jwt

from services.common.auth.assertions import ASSERTION_KEY, AssertionSigner
from services.common.auth.pki import load_identity
from services.common.auth.principal import CredentialKind, Principal, roles_from
from services.common.clients import MAX_MESSAGE_BYTES
from services.common.settings import Settings
from tests.issuer import LocalIssuer

Metadata = tuple[tuple[str, str], ...]
# Messages as large as the services accept, as Corral's own clients allow.
LARGE = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
AUDIENCE = "corral"
DEFAULT_TENANT = "default"
DEFAULT_USER = "anonymous"


@functools.cache  # one for the run
def issuer() -> LocalIssuer:
    local = LocalIssuer()
    atexit.register(local.close)
    return local


def issuers_setting() -> str:
    """CORRAL_OIDC_ISSUERS for services that accept the run's tokens."""
    return json.dumps([issuer().config(audience=AUDIENCE)])


@functools.lru_cache(maxsize=4096)
def token(tenant: str, user: str = "alice", role: str = "admin") -> str:
    return issuer().mint(tenant, user, roles=(role,) if role else (), audience=AUDIENCE)


def bearer(tenant: str, user: str = "alice", role: str = "admin") -> Metadata:
    """The metadata of a call made by `user` with `role` in `tenant`."""
    return (("authorization", f"Bearer {token(tenant, user, role)}"),)


Rewrite = Callable[[list[tuple[str, str]]], list[tuple[str, str]]]


def _rewritten(details: grpc.aio.ClientCallDetails, rewrite: Rewrite) -> grpc.aio.ClientCallDetails:
    metadata = rewrite([(str(k), str(v)) for k, v in details.metadata or ()])
    return details._replace(metadata=grpc.aio.Metadata(*metadata))  # type: ignore[attr-defined,no-any-return]


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, rewrite: Rewrite) -> None:
        self._rewrite = rewrite

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(_rewritten(client_call_details, self._rewrite), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, rewrite: Rewrite) -> None:
        self._rewrite = rewrite

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(_rewritten(client_call_details, self._rewrite), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, rewrite: Rewrite) -> None:
        self._rewrite = rewrite

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(_rewritten(client_call_details, self._rewrite), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, rewrite: Rewrite) -> None:
        self._rewrite = rewrite

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(_rewritten(client_call_details, self._rewrite), request_iterator)


def _rewriting(rewrite: Rewrite) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that rewrite the metadata of every call before it leaves: one per kind of
    call, since a grpc.aio channel files each interceptor under the first kind it implements."""
    return [_UnaryUnary(rewrite), _UnaryStream(rewrite), _StreamUnary(rewrite), _StreamStream(rewrite)]


def _default_credential(default: Metadata) -> Rewrite:
    """Adds `default` to every call that carries no credential of its own."""

    def rewrite(metadata: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if any(key == "authorization" for key, _ in metadata):
            return metadata
        return [*metadata, *default]

    return rewrite


def principal_of(metadata: Metadata | list[tuple[str, str]]) -> Principal:
    """The principal a bearer token of the run's issuer proves (read, not verified: the test
    minted it)."""
    [header] = [value for key, value in metadata if key == "authorization"]
    claims = jwt.decode(header.removeprefix("Bearer "), options={"verify_signature": False})
    return Principal(
        tenant=claims["tenant"], subject=claims["sub"], roles=roles_from(claims["roles"]),
        kind=CredentialKind.JWT, credential=claims["iss"],
    )


def _relayed_by(signer: AssertionSigner) -> Rewrite:
    """What a service relaying a user's call sends: the user's bearer token (one the run's
    issuer minted) becomes the assertion of the principal it proves, signed by the service."""

    def rewrite(metadata: list[tuple[str, str]]) -> list[tuple[str, str]]:
        kept = [(k, v) for k, v in metadata if k != "authorization"]
        if len(kept) == len(metadata):
            return kept
        return [*kept, (ASSERTION_KEY, signer.sign(principal_of(metadata)))]

    return rewrite


def public_channel(
    address: str, tenant: str = DEFAULT_TENANT, user: str = DEFAULT_USER, role: str = "admin"
) -> grpc.aio.Channel:
    """A channel to a service's public port whose calls carry `user`'s token in `tenant` unless a
    call brings its own credential (as tests/rpc.py `who` makes)."""
    return channel_with(address, bearer(tenant, user, role))


def channel_with(address: str, default: Metadata) -> grpc.aio.Channel:
    """A channel to a public port whose calls carry `default` unless they bring a credential."""
    return grpc.aio.insecure_channel(
        address, interceptors=_rewriting(_default_credential(default)), options=LARGE
    )


def internal_channel(settings: Settings, service: str, as_service: str) -> grpc.aio.Channel:
    """A channel to `service`'s internal listener, proving to be `as_service` with its
    certificate: how a test makes the calls that only a service may make. A call carrying a
    user's credential (`who(...)`) is made on that user's behalf, as `as_service` would relay it;
    one carrying none is made by `as_service` itself."""
    identity = load_identity(settings.pki_dir, as_service)
    return grpc.aio.secure_channel(
        settings.internal_addrs[service], identity.channel_credentials(),
        interceptors=_rewriting(_relayed_by(AssertionSigner(identity))), options=LARGE,
    )
