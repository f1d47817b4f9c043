"""The server interceptor that decides who is calling and whether they may, before any work is
done: every method's needs come from the table in methods.py.

On the public listener a caller presents `authorization: Bearer <API key or JWT>`. On the internal
listener the peer proved a service identity with its certificate (mutual TLS); it calls either
as itself (optionally naming the tenant it acts in) or relays a user's principal as an assertion
signed by the service that verified the user's credential. Headers naming a tenant or a principal
are ignored unless the peer is a service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from services.common import identity
from services.common.auth.assertions import ASSERTION_KEY, AssertionVerifier
from services.common.auth.methods import Access, access_for
from services.common.auth.oidc import looks_like_jwt
from services.common.auth.principal import Principal, check_name
from services.common.auth.verify import CredentialVerifier
from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated
from services.common.interceptors import Context, Handler, WrappingInterceptor, rewrapped
from services.common.settings import SERVICES

AUTHORIZATION = "authorization"
# Honoured only from a peer with a service identity: the tenant a service acts in.
TENANT_KEY = "x-corral-tenant"
API_KEY_PREFIX = "crl_"


def peer_service(context: Context) -> str | None:
    """The Corral service the peer proved to be with its certificate, if it presented one. The
    internal listener accepts only certificates from the service CA."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    names = list(auth.get("x509_common_name") or ())
    name = names[0].decode() if names else ""
    return name if name in SERVICES else None


class Authenticator:
    """Turns what a call carries into a verified principal."""

    def __init__(
        self,
        assertions: AssertionVerifier,
        api_keys: CredentialVerifier | None = None,
        tokens: CredentialVerifier | None = None,
    ) -> None:
        self._assertions = assertions
        self._api_keys = api_keys
        self._tokens = tokens

    async def verify(self, metadata: Mapping[str, str], peer: str | None) -> identity.Verified:
        if peer is not None:
            assertion = metadata.get(ASSERTION_KEY, "")
            if assertion:
                return identity.Verified(self._assertions.verify(assertion), assertion)
            tenant = metadata.get(TENANT_KEY, "")
            if tenant:
                try:
                    check_name(tenant, "tenant")
                except InvalidArgument as exc:
                    raise Unauthenticated(str(exc)) from None
            return identity.Verified(Principal.of_service(peer, tenant))
        return identity.Verified(await self._bearer(metadata.get(AUTHORIZATION, "")))

    async def _bearer(self, header: str) -> Principal:
        if not header:
            raise Unauthenticated(
                "this method needs a credential: send `authorization: Bearer <API key or token>` "
                "(the corral command takes --api-key or CORRAL_API_KEY)"
            )
        scheme, _, credential = header.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise Unauthenticated("the authorization header must be `Bearer <API key or token>`")
        if credential.startswith(API_KEY_PREFIX):
            if self._api_keys is None:
                raise Unauthenticated("this service does not accept API keys")
            return await self._api_keys.verify(credential)
        if looks_like_jwt(credential):
            if self._tokens is None:
                raise Unauthenticated("no identity provider is configured to accept bearer tokens")
            return await self._tokens.verify(credential)
        raise Unauthenticated("the credential is neither a Corral API key (crl_...) nor a JWT")

    async def admit(
        self, metadata: Mapping[str, str], peer: str | None, method: str, access: Access | None = None
    ) -> identity.Verified:
        """The verified caller of `method` (a full gRPC method name), if the access table lets it
        call: what the interceptor does for every gRPC call, and what another transport into the
        same method (telemetry's OTLP over HTTP) does too."""
        verified = await self.verify(metadata, peer)
        # A method missing from the table (the host refuses to start with one) is no one's.
        authorize(access or access_for(method) or Access(), verified, peer, method)
        return verified


def authorize(access: Access, verified: identity.Verified, peer: str | None, method: str) -> None:
    """Raises PermissionDenied unless the principal (or the service relaying it) may call."""
    if peer is not None and peer in access.services:
        return
    principal = verified.principal
    if access.allows(principal):
        return
    name = method.rsplit("/", 1)[-1]
    if principal.is_service:
        raise PermissionDenied(f"the {principal.service} service may not call {name}")
    held = principal.role.label if principal.role else "no role"
    raise PermissionDenied(
        f"{principal.subject} has {held} in tenant {principal.tenant!r}; {name} needs "
        f"{access.describe()}"
    )


class AuthInterceptor(WrappingInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        super().__init__()
        self._authenticator = authenticator

    async def _enter(self, context: Context, access: Access, method: str) -> Any:
        pairs = [(k, v) for k, v in context.invocation_metadata() or () if isinstance(v, str)]
        if sum(key == AUTHORIZATION for key, _ in pairs) > 1:
            # One credential per call: a proxy may join repeated headers into one value, and
            # which of them was checked would then be anyone's guess.
            raise Unauthenticated("send one authorization header, not several")
        verified = await self._authenticator.admit(dict(pairs), peer_service(context), method, access)
        return identity.enter(verified)

    def _wrap(self, handler: Handler, method: str) -> Handler:
        # A method missing from the table (the host refuses to start with one) is no one's.
        access = access_for(method) or Access()
        if access.open:
            return handler
        enter = self._enter

        def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: Context) -> Any:
                token = await enter(context, access, method)
                try:
                    return await behavior(request, context)
                finally:
                    identity.leave(token)

            return run

        def streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: Context) -> AsyncIterator[Any]:
                token = await enter(context, access, method)
                try:
                    async for item in behavior(request, context):
                        yield item
                finally:
                    identity.leave(token)

            return run

        return rewrapped(handler, unary, streaming)
