"""The executor's HTTP port: the JWKS that tool services verify invocation tokens with, the
revocation check they call per request, and Prometheus metrics."""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.common.errors import Unavailable
from services.common.http_server import HttpSite
from services.executor.credentials import JTI, CredentialIssuer

log = logging.getLogger(__name__)

# Verifiers cache the JWKS this long; keys are published well before they sign (KeyRing), so a
# cached copy is never missing a key that is signing.
JWKS_MAX_AGE_S = 300


class ExecutorHttp(HttpSite):
    def __init__(
        self, issuer: CredentialIssuer, registry: CollectorRegistry, host: str, port: int
    ) -> None:
        self._issuer = issuer
        self._registry = registry
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self._jwks)
        app.router.add_get("/v1/revocations/{jti}", self._revocation)
        app.router.add_get("/metrics", self._metrics)
        super().__init__(app, host, port, "executor HTTP")

    async def _jwks(self, _request: web.Request) -> web.Response:
        return web.json_response(
            await self._issuer.jwks(),
            headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE_S}"},
        )

    async def _revocation(self, request: web.Request) -> web.Response:
        jti = request.match_info["jti"]
        if not JTI.match(jti):
            return _error(400, f"jti {jti!r} is not a token id (32 lowercase hex digits)")
        try:
            revoked = await self._issuer.is_revoked(jti)
        except Unavailable as err:
            log.warning("revocation check for %s failed: %s", jti, err.message)
            # Not an answer either way: the verifier must fail closed and may retry.
            return _error(503, "the revocation list is unavailable; retry")
        return web.json_response(
            {"jti": jti, "revoked": revoked}, headers={"Cache-Control": "no-store"}
        )

    async def _metrics(self, _request: web.Request) -> web.Response:
        # Collectors may do real work; keep it off the event loop.
        body = await asyncio.to_thread(generate_latest, self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"error": message}),
        content_type="application/json",
    )
