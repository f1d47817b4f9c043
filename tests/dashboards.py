"""The Grafana dashboards in deploy/grafana as a test reads them: every PromQL query (panel targets
and template variables), and the metric and label names each one uses."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"

# Labels Prometheus adds to every series it scrapes, and the bucket bound of histograms.
TARGET_LABELS = frozenset({"job", "instance"})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_NAME = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![a-zA-Z0-9_:]|\s*\()")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.+),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)\s*$")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


@dataclass(frozen=True)
class Query:
    """One PromQL expression of a dashboard, and where it is."""

    dashboard: str
    where: str
    expr: str
    # Label names a template variable's label_values() lists.
    listed_labels: tuple[str, ...] = ()

    @property
    def metrics(self) -> set[str]:
        """Every metric (sample) name the expression selects."""
        text = _GROUPING.sub(" ", _RANGE.sub(" ", self.expr))
        text = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", text)
        text = _STRING.sub(" ", text)
        return {n for n in _NAME.findall(text) if n.lower() not in _KEYWORDS}

    @property
    def matchers(self) -> dict[str, set[str]]:
        """metric name → the label names its selectors match on."""
        found: dict[str, set[str]] = {}
        for name, body in _SELECTOR.findall(_RANGE.sub(" ", self.expr)):
            found.setdefault(name, set()).update(_MATCHER.findall(_STRING.sub('""', body)))
        return found

    @property
    def grouping(self) -> set[str]:
        """Label names of by (…), without (…), on (…) clauses, and of label_values()."""
        labels = {label.strip() for clause in _GROUPING.findall(self.expr)
                  for label in clause.split(",") if label.strip()}
        return labels | set(self.listed_labels)


@dataclass
class Dashboard:
    path: Path
    model: dict[str, Any] = field(default_factory=dict)

    def queries(self) -> Iterator[Query]:
        name = self.path.name
        for panel in _panels(self.model.get("panels", [])):
            for target in panel.get("targets", []):
                yield Query(name, f"panel {panel.get('title')!r} {target.get('refId')}", target["expr"])
        for var in self.model.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = _LABEL_VALUES.match(query)
            expr, labels = (m.group(1), (m.group(2),)) if m else (query, ())
            yield Query(name, f"variable ${var['name']}", expr, labels)


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboards() -> list[Dashboard]:
    return [Dashboard(p, json.loads(p.read_text())) for p in sorted(DASHBOARDS.glob("*.json"))]


def sample_names(name: str, kind: str) -> list[str]:
    """The sample names a metric family of `kind` exposes (prometheus_client's conventions)."""
    if kind == "counter":
        return [f"{name}_total"]
    if kind == "histogram":
        return [f"{name}_bucket", f"{name}_count", f"{name}_sum"]
    return [name]
