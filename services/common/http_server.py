"""An aiohttp server on a port of a service's own, beside its gRPC server (the executor's JWKS,
revocations and metrics; telemetry's OTLP over HTTP): started, its bound port known, closed."""

from __future__ import annotations

import logging

from aiohttp import web

log = logging.getLogger(__name__)


class HttpSite:
    def __init__(
        self, app: web.Application, host: str, port: int, what: str, *, auto_decompress: bool = True
    ) -> None:
        self._app = app
        # False: handlers see bodies as sent, Content-Encoding and all (to bound what they inflate).
        self._auto_decompress = auto_decompress
        self._host = host
        self._requested_port = port
        self._what = what
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0)."""
        if self._port is None:
            raise RuntimeError(f"{self._what} is not started")
        return self._port

    async def start(self) -> None:
        # No access log: some routes are hit once per call (revocation checks, span exports).
        runner = web.AppRunner(self._app, access_log=None, auto_decompress=self._auto_decompress)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._requested_port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        log.info("%s on %s:%d", self._what, self._host, self._port)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
