"""Ports the OS picks, held bound but not listening: the OS gives a held port to no one else and
refuses connections to it, until a server meant to have it binds it too."""

from __future__ import annotations

import socket


class HeldPort:
    """A port chosen by binding port 0 on `host` (IPv4), kept until `close()`.

    `handover=True` lets a server take the port over while it is held: gRPC, aiohttp and
    http.server bind with SO_REUSEADDR, which Linux allows beside a socket that does not listen.
    Without it nothing else can bind the port, which makes a reliable address that refuses
    connections."""

    def __init__(self, host: str = "127.0.0.1", *, handover: bool = False) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if handover:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))
        self.port: int = self._socket.getsockname()[1]
        self.address = f"{host}:{self.port}"

    def close(self) -> None:
        self._socket.close()
