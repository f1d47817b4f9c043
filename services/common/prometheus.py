"""Prometheus exposition: a service refreshes a snapshot of its metrics in the background and a
collector serves the latest snapshot, so a scrape never waits on the database."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.background import Periodic

log = logging.getLogger(__name__)


@dataclass
class Family:
    name: str
    help: str
    labels: tuple[str, ...]
    kind: str = "gauge"  # or "counter"
    samples: list[tuple[tuple[str, ...], float]] = field(default_factory=list)


Snapshot = list[Family]


class _SnapshotCollector(Collector):
    def __init__(self) -> None:
        self.snapshot: Snapshot = []

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        for fam in self.snapshot:
            metric = (CounterMetricFamily if fam.kind == "counter" else GaugeMetricFamily)(
                fam.name, fam.help, labels=list(fam.labels))
            for labels, value in fam.samples:
                metric.add_metric(list(labels), value)
            yield metric


class MetricsExporter:
    """Serves /metrics on `port` (0: disabled) from snapshots `refresh` computes every `every_s`."""

    def __init__(self, port: int, refresh: Callable[[], Awaitable[Snapshot]], every_s: float = 10.0) -> None:
        self.port = port
        self.refresh = refresh
        self._collector = _SnapshotCollector()
        self._refreshing = Periodic(self.refresh_now, every_s=every_s, what="refreshing Prometheus metrics")
        self._server: WSGIServer | None = None

    def start(self) -> None:
        if not self.port:
            return
        registry = CollectorRegistry()
        registry.register(self._collector)
        self._server, _thread = start_http_server(self.port, addr="0.0.0.0", registry=registry)
        self._refreshing.start()

    async def refresh_now(self) -> None:
        self._collector.snapshot = await self.refresh()

    async def stop(self) -> None:
        await self._refreshing.close()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
