"""How a requested metric becomes an analysis spec: tolerance, fail margin and their defaults."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.telemetry.model import MetricRequest
from services.telemetry.rules import metric_spec


def test_session_errors_fail_on_any_established_degradation_by_default() -> None:
    spec = metric_spec(MetricRequest("session_error_rate", tolerance=0.02), "metrics[0]")
    assert spec.tolerance.value == 0.02 and spec.margin.value == 0.0


def test_an_explicit_fail_margin_is_where_failing_starts() -> None:
    spec = metric_spec(MetricRequest("session_error_rate", tolerance=0.02, fail_margin=0.02), "metrics[0]")
    assert spec.margin.value == 0.02
    latency = metric_spec(MetricRequest("latency_p95", tolerance=0.05), "metrics[1]")
    assert latency.margin.value == 0.05, "other metrics fail beyond their tolerance"


@pytest.mark.parametrize("request_", [
    MetricRequest("session_error_rate", fail_margin=-0.1),
    MetricRequest("session_error_rate", tolerance=0.01, fail_margin=0.5),
    MetricRequest("no_such_metric"),
    MetricRequest("latency_p95", tolerance=-1),
])
def test_bad_metrics_name_their_field(request_: MetricRequest) -> None:
    with pytest.raises(InvalidArgument) as err:
        metric_spec(request_, "metrics[3]")
    assert err.value.violations[0].field.startswith("metrics[3].")
