"""MetricSpec as the corral.telemetry.v1.MetricSpec message, both ways: for the registry, which
sends it and returns it in rollouts, and for telemetry, which receives it."""

from __future__ import annotations

from corral.telemetry.v1 import telemetry_pb2 as tel
from services.common.metric_spec import Direction, MetricSpec

# The directions' names are the message's enum names without their prefix.
DIRECTION_TO_PB = {d: tel.MetricDirection.Value(f"METRIC_DIRECTION_{d.value}") for d in Direction}
DIRECTION_FROM_PB = {v: k for k, v in DIRECTION_TO_PB.items()}


def metric_from_pb(m: tel.MetricSpec) -> MetricSpec:
    return MetricSpec(
        name=m.name,
        direction=DIRECTION_FROM_PB.get(m.direction),
        tolerance=m.tolerance if m.HasField("tolerance") else None,
        relative=m.relative if m.HasField("relative") else None,
        fail_margin=m.fail_margin if m.HasField("fail_margin") else None,
    )


def metric_pb(m: MetricSpec) -> tel.MetricSpec:
    out = tel.MetricSpec(
        name=m.name,
        direction=DIRECTION_TO_PB[m.direction] if m.direction else tel.METRIC_DIRECTION_UNSPECIFIED,
    )
    if m.tolerance is not None:
        out.tolerance = m.tolerance
    if m.relative is not None:
        out.relative = m.relative
    if m.fail_margin is not None:
        out.fail_margin = m.fail_margin
    return out
