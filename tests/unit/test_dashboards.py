"""deploy/grafana and deploy/prometheus against the code: every query of every dashboard names
metrics the services export, with labels those metrics carry (gathered from the services' own
registries, not from a list kept here), and Prometheus scrapes each service where it serves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from services.common.rpc_metrics import RpcMetricsInterceptor
from services.common.settings import SERVICES, Settings
from services.executor.metrics import ExecutorMetrics
from services.registry.prometheus import rollout_snapshot
from services.telemetry.metrics import TelemetryMetrics
from tests.dashboards import ROOT, TARGET_LABELS, Query, dashboards, sample_names
from tests.fakes.common import FakeClock
from tests.fakes.registry import FakeRegistryStore

Exported = dict[str, frozenset[str]]


def _registry_metrics(registry: CollectorRegistry) -> Exported:
    found: Exported = {}
    # The label names of a metric no sample has used yet are only on the metric object.
    for collector in list(registry._collector_to_names):
        labels = frozenset(getattr(collector, "_labelnames", ()))
        for family in collector.collect():
            for name in sample_names(family.name, family.type):
                found[name] = labels | ({"le"} if name.endswith("_bucket") else set())
    return found


async def exported() -> Exported:
    """Every sample name the five services can expose, with its label names."""
    rpc = CollectorRegistry()
    RpcMetricsInterceptor(rpc)
    found: Exported = {}
    for registry in (ExecutorMetrics().registry, TelemetryMetrics().registry, rpc):
        found.update(_registry_metrics(registry))
    for family in await rollout_snapshot(FakeRegistryStore(FakeClock()))():
        for name in sample_names(family.name, family.kind):
            found[name] = frozenset(family.labels)
    return found


QUERIES = [q for d in dashboards() for q in d.queries()]


def test_the_dashboards_are_there() -> None:
    names = {d.path.name for d in dashboards()}
    assert {"corral-agent-versions.json", "corral-rollouts.json", "corral-sandboxes.json",
            "corral-services.json"} <= names
    uids = [d.model["uid"] for d in dashboards()]
    assert len(uids) == len(set(uids))


def test_metric_names_are_read_from_promql() -> None:
    query = Query("d", "p", 'sum by (le, agent) (rate(foo_bucket{agent=~"$a", code!="OK"}[5m])) '
                            "/ on (agent) bar_total * 3600")
    assert query.metrics == {"foo_bucket", "bar_total"}
    assert query.matchers == {"foo_bucket": {"agent", "code"}}
    assert query.grouping == {"le", "agent"}


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: f"{q.dashboard}: {q.where}")
async def test_every_query_names_exported_metrics_and_their_labels(query: Query) -> None:
    metrics = await exported()
    assert query.metrics, f"{query.expr!r} names no metric"
    unknown = query.metrics - set(metrics)
    assert not unknown, f"{query.expr!r}: no service exports {sorted(unknown)}"
    for name, labels in query.matchers.items():
        missing = labels - metrics[name] - TARGET_LABELS
        assert not missing, f"{query.expr!r}: {name} has no label {sorted(missing)}"
    carried = set().union(*(metrics[name] for name in query.metrics)) | TARGET_LABELS
    assert not query.grouping - carried, f"{query.expr!r}: no label {sorted(query.grouping - carried)}"


def test_prometheus_scrapes_every_service_on_its_metrics_port() -> None:
    text = (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text()
    jobs = dict(re.findall(r'job_name: corral-(\w+)\n\s+static_configs:\n\s+- targets: \["[\d.]+:(\d+)"\]', text))
    defaults = Settings.from_env({})
    ports = {**defaults.metrics_ports, "executor": defaults.executor.http_port}
    assert {svc: int(port) for svc, port in jobs.items()} == {svc: ports[svc] for svc in SERVICES}


def test_grafana_provisions_the_dashboards_folder() -> None:
    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    assert "type: file" in (provisioning / "dashboards" / "corral.yaml").read_text()
    assert "type: prometheus" in (provisioning / "datasources" / "corral.yaml").read_text()
    for dashboard in dashboards():
        variables = {v["name"] for v in dashboard.model["templating"]["list"]}
        assert "datasource" in variables, f"{Path(dashboard.path).name} has no data source variable"
