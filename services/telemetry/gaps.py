"""Missing data and the analyses: spans an exporter dropped, or still holds undelivered, that may
belong to an analysed window make the window's verdict INCONCLUSIVE, never PASS. Pure rules."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from services.telemetry.analysis import ExperimentAnalysis, RolloutAnalysis, Verdict

# Names listed in one reason at most; the rest are counted.
_MAX_NAMED = 3
# A backlog its exporter has not reported on for this long is forgotten: an executor that is behind
# reports at every attempt once it reaches telemetry, so this one is gone (or cut off for long),
# and its spans with it; it must not hold every analysis for ever.
BACKLOG_EXPIRY = timedelta(minutes=15)


@dataclass(frozen=True)
class Backlog:
    """An exporter's latest report (made at `report_time`): the oldest span it still held
    undelivered."""

    exporter: str
    undelivered_since: datetime
    report_time: datetime


@dataclass(frozen=True)
class DroppedSpans:
    exporter: str
    start: datetime
    end: datetime
    count: int


@dataclass(frozen=True)
class DeliveryReport:
    """What one exporter says: its backlog's start (None: it holds nothing) and new drops."""

    exporter: str
    undelivered_since: datetime | None
    drops: tuple[DroppedSpans, ...]


def missing_data(
    start: datetime, end: datetime, backlogs: Sequence[Backlog], drops: Sequence[DroppedSpans],
    now: datetime,
) -> str:
    """Why spans of [start, end) may be missing, for a human; "" when nothing says so. A drop
    counts when its interval meets the window; a backlog when it starts before the window ends
    (its spans, or later ones, may fall in the window) and was reported within BACKLOG_EXPIRY."""
    parts: list[str] = []
    dropped = [d for d in drops if d.start < end and d.end >= start]
    if dropped:
        total = sum(d.count for d in dropped)
        first, last = min(d.start for d in dropped), max(d.end for d in dropped)
        parts.append(
            f"{total} spans dropped by {_names({d.exporter for d in dropped})} "
            f"(started {_at(first)} to {_at(last)})"
        )
    waiting = [b for b in backlogs
               if b.undelivered_since < end and now - b.report_time <= BACKLOG_EXPIRY]
    if waiting:
        since = min(b.undelivered_since for b in waiting)
        parts.append(
            f"spans since {_at(since)} not yet delivered by {_names({b.exporter for b in waiting})}"
        )
    return "; ".join(parts)


def hold_rollout(result: RolloutAnalysis, missing: str) -> RolloutAnalysis:
    """A PASS over a window with missing data is INCONCLUSIVE. A FAIL stays: the data that did
    arrive already shows the candidate worse, and rolling back is the safe side."""
    if not missing:
        return result
    if result.verdict is Verdict.PASS:
        return replace(result, verdict=Verdict.INCONCLUSIVE,
                       reason=f"missing data: {missing}", missing_data=missing)
    return replace(result, reason=f"{result.reason}; missing data: {missing}",
                   missing_data=missing)


def hold_experiment(result: ExperimentAnalysis, missing: str) -> ExperimentAnalysis:
    """No winner over a window with missing data."""
    return replace(result, missing_data=missing) if missing else result


def _names(exporters: set[str]) -> str:
    named = sorted(exporters)
    if len(named) <= _MAX_NAMED:
        return ", ".join(named)
    return ", ".join(named[:_MAX_NAMED]) + f" and {len(named) - _MAX_NAMED} more"


def _at(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds")
