"""Prometheus exposition shared by every service: the one label vocabulary and latency buckets,
and `RefreshedSnapshot` (metrics read from storage in the background, so a scrape never waits on the
database), and `MetricsExporter`, which the service host uses to serve a service's registry.

Every metric about an agent version carries the same labels with the same values, whichever
service exports it: `tenant`, `agent` (the id, `progress-report`), `version` (the number, `3`),
`endpoint` (the id, `prod`; "" when the caller named a version). Outcomes are `code`: `OK` or the
error's reason in UPPER_SNAKE (`AGENT_ERROR`, `TIMEOUT`, …). Other labels: `tool`, `model`,
`direction` (`input`/`output` tokens), `kind`/`rollout` (a run's kind and id), `state`,
`metric`, `driver`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from corral.names import EndpointRef, VersionRef
from services.common.background import Periodic

log = logging.getLogger(__name__)

SERIES_LABELS = ("tenant", "agent", "version", "endpoint")
# Seconds. An invocation may be a cached answer (milliseconds) or minutes of model calls.
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OK = "OK"


@dataclass(frozen=True)
class Series:
    """Which agent version a sample is about, as the labels of SERIES_LABELS."""

    tenant: str
    agent: str
    version: str
    endpoint: str = ""

    @classmethod
    def of(cls, tenant: str, version: VersionRef, endpoint: str = "") -> Series:
        """`endpoint` as a full name (`agents/a/endpoints/prod`), an id, or ""."""
        endpoint_id = endpoint.rsplit("/", 1)[-1] if endpoint.startswith("agents/") else endpoint
        return cls(tenant, version.agent, str(version.number or version.digest), endpoint_id)

    @classmethod
    def of_endpoint(cls, tenant: str, endpoint: EndpointRef, version: int = 0) -> Series:
        return cls(tenant, endpoint.agent, str(version) if version else "", endpoint.endpoint)

    @property
    def labels(self) -> tuple[str, str, str, str]:
        return (self.tenant, self.agent, self.version, self.endpoint)


@dataclass
class Family:
    name: str
    help: str
    labels: tuple[str, ...]
    kind: str = "gauge"  # or "counter"
    samples: list[tuple[tuple[str, ...], float]] = field(default_factory=list)


Snapshot = list[Family]


class RefreshedSnapshot(Collector):
    """Metrics read from storage: `refresh` computes them every `every_s` in the background and a
    scrape serves the latest (so it never waits on the database)."""

    def __init__(self, refresh: Callable[[], Awaitable[Snapshot]], every_s: float = 10.0) -> None:
        self.refresh = refresh
        self.snapshot: Snapshot = []
        self._refreshing = Periodic(self.refresh_now, every_s=every_s, what="refreshing Prometheus metrics")

    def start(self) -> None:
        self._refreshing.start()

    async def close(self) -> None:
        await self._refreshing.close()

    async def refresh_now(self) -> None:
        self.snapshot = await self.refresh()

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        for fam in self.snapshot:
            metric = (CounterMetricFamily if fam.kind == "counter" else GaugeMetricFamily)(
                fam.name, fam.help, labels=list(fam.labels))
            for labels, value in fam.samples:
                metric.add_metric(list(labels), value)
            yield metric


class MetricsExporter:
    """Serves `registry` as /metrics on `port` (0: disabled), in a thread of its own."""

    def __init__(self, port: int, registry: CollectorRegistry) -> None:
        self.port = port
        self.registry = registry
        self._server: WSGIServer | None = None

    def start(self) -> None:
        if not self.port:
            return
        self._server, _thread = start_http_server(self.port, addr="0.0.0.0", registry=self.registry)
        log.info("Prometheus metrics on :%d/metrics", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
