"""The base of every service's app.py: the wiring of one service from its settings, which
ServiceHost starts (start) and stops (drain, then the stack it filled)."""

from __future__ import annotations

from services.common.server import Service
from services.common.settings import Settings


class App(Service):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
