"""What telemetry's requests must satisfy beyond the shape of the names in them (span filters,
scores, comparisons and experiments), the page sizes, and the order versions are listed in. Pure:
no I/O."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from corral.names import AgentRef, ResourceNameError, VersionRef
from services.common.errors import InvalidArgument
from services.telemetry import analysis
from services.telemetry.log_model import LogFilter, LogRow
from services.telemetry.model import (
    AnalysisScope,
    MetricRequest,
    ScoreInput,
    SpanFilter,
    Variant,
    VersionComparison,
)

# Spans and traces come many to an invocation: a larger default page than other listings.
SPAN_PAGE_SIZE = 100
SCORE_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,62}$")
MAX_COMMENT = 4000
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


# -- span queries --------------------------------------------------------------------------------


def check_window(start: datetime | None, end: datetime | None, prefix: str = "") -> None:
    if start is not None and end is not None and end < start:
        raise InvalidArgument.field(prefix + "end_time", "is before start_time; swap them")


def checked_filter(where: SpanFilter, prefix: str = "filter.") -> SpanFilter:
    """`where` with its trace id normalised, or InvalidArgument naming the field at fault."""
    for name, ref in (("version", where.version), ("endpoint", where.endpoint)):
        if where.agent is not None and ref is not None and ref.parent != where.agent:
            raise InvalidArgument.field(
                prefix + name,
                f"{ref.name!r} does not belong to {prefix}agent {where.agent.name!r}; "
                "drop one of them",
            )
    trace_id = where.trace_id.lower()
    if trace_id and not _TRACE_ID.match(trace_id):
        raise InvalidArgument.field(
            prefix + "trace_id", f"{where.trace_id!r} is not a trace id (32 hex digits)"
        )
    check_window(where.start_time, where.end_time, prefix)
    return replace(where, trace_id=trace_id)


def version_order(version: str) -> tuple[int, int, str]:
    """versions/10 after versions/2; names that are not numbered versions (spans are not
    validated on ingest) go last, alphabetically."""
    try:
        return (0, VersionRef.parse(version).number, "")
    except ResourceNameError:
        return (1, 0, version)


# -- logs ----------------------------------------------------------------------------------------

# Bytes of log bodies kept per invocation, over every export of it.
MAX_INVOCATION_LOG_BYTES = 64 * 1024
LOG_PAGE_SIZE = 100
# The source of the platform's own records (a note that output was dropped).
PLATFORM_SOURCE = "corral"
_INVOCATION_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def budget_scope(row: LogRow) -> str:
    """What a record counts against: its invocation, else its trace; "" (no bound but each
    record's own) when it names neither."""
    if row.invocation_id:
        return row.invocation_id
    return f"trace:{row.trace_id}" if row.trace_id else ""


def within_budget(
    rows: Sequence[LogRow], used: int, limit: int
) -> tuple[list[LogRow], int, LogRow | None]:
    """The rows of one scope that fit in what is left of `limit` after `used` bytes, the bytes
    used then, and, when some did not fit, a note to store in their place (once per scope: the
    caller keeps whether it already has)."""
    kept: list[LogRow] = []
    first_dropped: LogRow | None = None
    for row in rows:
        if row.platform and row.source == PLATFORM_SOURCE:
            kept.append(row)  # the executor's own note of what it dropped: not the agent's output
            continue
        if used + row.size > limit:
            first_dropped = first_dropped or row
            continue
        used += row.size
        kept.append(row)
    if first_dropped is None:
        return kept, used, None
    note = replace(
        first_dropped, source=PLATFORM_SOURCE, severity_number=13, severity_text="WARN",
        body=f"[output truncated: this invocation's logs reached {limit // 1024} KiB; later "
             "records were dropped]",
    )
    return kept, used, note


def checked_log_filter(where: LogFilter) -> LogFilter:
    """`where`, or InvalidArgument naming the field at fault."""
    if where.version is not None and where.version.parent != where.agent:
        raise InvalidArgument.field(
            "version",
            f"{where.version.name!r} does not belong to agent {where.agent.name!r}; drop one of "
            "them",
        )
    if where.invocation_id and not _INVOCATION_ID.match(where.invocation_id):
        raise InvalidArgument.field(
            "invocation_id",
            f"{where.invocation_id!r} is not an invocation id (letters, digits, _ . : -, as "
            "InvocationInfo.invocation_id)",
        )
    return where


# -- scores --------------------------------------------------------------------------------------


def valid_score_name(name: str) -> bool:
    return bool(SCORE_NAME.match(name))


def check_score(score: ScoreInput) -> None:
    if not valid_score_name(score.name):
        raise InvalidArgument.field(
            "score.score_name",
            f"{score.name!r}: use lowercase letters, digits, _ . - (e.g. clinical_accuracy)",
        )
    if not math.isfinite(score.value) or not 0.0 <= score.value <= 1.0:
        raise InvalidArgument.field(
            "score.value",
            f"{score.value} is outside [0, 1]; normalise it (a 4 out of 5 is 0.8, accepted is 1)",
        )
    if len(score.comment) > MAX_COMMENT:
        raise InvalidArgument.field("score.comment", f"is longer than {MAX_COMMENT} characters")


# -- comparisons and experiments -----------------------------------------------------------------


def _threshold(value: float | None, relative: bool | None, field: str) -> analysis.Threshold | None:
    if value is None:
        return None
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument.field(field, f"{value} must be a number >= 0")
    return analysis.Threshold(value, relative=bool(relative))


def metric_spec(m: MetricRequest, field: str) -> analysis.MetricSpec:
    """The analysis spec for a requested metric; InvalidArgument names `field`.<part> at fault."""
    try:
        analysis.check_metric_name(m.name)
    except ValueError as exc:
        raise InvalidArgument.field(f"{field}.name", str(exc)) from None
    score = m.name.removeprefix(analysis.SCORE_PREFIX)
    if score != m.name and not valid_score_name(score):
        raise InvalidArgument.field(
            f"{field}.name", f"{m.name!r}: a score name is lowercase letters, digits, _ . -"
        )
    tolerance = _threshold(m.tolerance, m.relative, f"{field}.tolerance")
    margin = _threshold(m.fail_margin, m.relative, f"{field}.fail_margin")
    direction = analysis.Direction[m.direction.name] if m.direction is not None else None
    # The tolerance is the bar for passing. Failing starts at the metric's fail margin: the
    # tolerance itself unless given, except for the session error rate, which by default fails on
    # any degradation the evidence establishes (what rolls a bad candidate back in ~100 sessions).
    try:
        return analysis.metric(
            m.name, tolerance=tolerance, direction=direction, fail_margin=margin
        )
    except ValueError as exc:
        raise InvalidArgument.field(f"{field}.fail_margin", str(exc)) from None


def score_names(specs: Sequence[analysis.MetricSpec]) -> tuple[str, ...]:
    """The scores the specs compare (score:<name> metrics), by name."""
    return tuple(s.name.removeprefix(analysis.SCORE_PREFIX) for s in specs if s.is_score)


def checked_window(scope: AnalysisScope) -> tuple[datetime, datetime]:
    if scope.start is None or scope.end is None or scope.end <= scope.start:
        raise InvalidArgument.field("start_time", "give a window: start_time before end_time")
    return scope.start, scope.end


def _check_scope(scope: AnalysisScope) -> None:
    checked_window(scope)
    if scope.endpoint is not None and scope.endpoint.parent != scope.agent:
        raise InvalidArgument.field(
            "endpoint", f"{scope.endpoint} is not an endpoint of {scope.agent}"
        )
    if scope.alpha and not 0 < scope.alpha < 1:
        raise InvalidArgument.field("alpha", f"{scope.alpha} must be in (0, 1)")


def _specs(scope: AnalysisScope) -> list[analysis.MetricSpec]:
    specs = [metric_spec(m, f"metrics[{i}]") for i, m in enumerate(scope.metrics)]
    return specs or list(analysis.DEFAULT_METRICS)


def _check_version_of(agent: AgentRef, version: VersionRef, field: str) -> None:
    if version.parent != agent:
        raise InvalidArgument.field(field, f"{version} is not a version of {agent}")


def comparison_plan(
    c: VersionComparison,
) -> tuple[list[analysis.MetricSpec], analysis.AnalysisConfig]:
    """The metrics to compare and the analysis settings, or InvalidArgument."""
    _check_version_of(c.scope.agent, c.baseline, "baseline_version")
    _check_version_of(c.scope.agent, c.candidate, "candidate_version")
    if c.baseline == c.candidate:
        raise InvalidArgument.field("candidate_version", "must differ from baseline_version")
    _check_scope(c.scope)
    if c.min_sessions < 0:
        raise InvalidArgument.field("min_sessions", "must not be negative")
    specs = _specs(c.scope)
    if len({s.name for s in specs}) != len(specs):
        raise InvalidArgument.field("metrics", "a metric is listed twice")
    config = analysis.AnalysisConfig(
        alpha=c.scope.alpha or 0.05, min_sessions=max(1, c.min_sessions or 200)
    )
    return specs, config


def experiment_plan(
    scope: AnalysisScope, variants: Sequence[Variant]
) -> tuple[list[analysis.MetricSpec], analysis.AnalysisConfig]:
    """The metrics to report and the analysis settings, or InvalidArgument."""
    if len(variants) < 2:
        raise InvalidArgument.field(
            "variants", "an experiment needs a control and at least one variant"
        )
    for i, v in enumerate(variants):
        _check_version_of(scope.agent, v.version, f"variants[{i}].version")
        if not 0 < v.percent <= 100:
            raise InvalidArgument.field(
                f"variants[{i}].percent", f"{v.percent} must be > 0 and <= 100"
            )
    if len({v.version for v in variants}) != len(variants):
        raise InvalidArgument.field("variants", "a version is listed twice")
    _check_scope(scope)
    config = analysis.EXPERIMENT_CONFIG
    config = dataclasses.replace(config, alpha=scope.alpha or config.alpha)
    return _specs(scope), config

