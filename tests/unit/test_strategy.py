"""Strategy files and duration strings for `corral rollout start`."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.registry.v1 import rollouts_pb2 as pb
from corral.strategy import StrategyError, load_strategy_file, parse_duration, parse_weights
from corral.telemetry.v1 import telemetry_pb2 as tel

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rollout-strategy.toml"


def test_the_example_file_loads_into_a_rollout() -> None:
    r = pb.Rollout()
    load_strategy_file(EXAMPLE, r)
    weights = [s.set_weight for s in r.steps if s.WhichOneof("kind") == "set_weight"]
    assert weights == [5, 50, 100]
    gates = [s for s in r.steps if s.WhichOneof("kind") == "analysis"]
    assert len(gates) == 2 and gates[0].analysis.max_duration.seconds == 7 * 86400
    assert r.analysis.interval.seconds == 30 and r.analysis.min_sessions == 200
    assert r.rollback_policy == pb.SESSION_POLICY_MIGRATE
    names = {m.name: m for m in r.analysis.metrics}
    assert names["latency_p95"].relative and names["latency_p95"].tolerance == pytest.approx(0.2)
    assert names["score:clinical_accuracy"].direction == tel.METRIC_DIRECTION_HIGHER_IS_BETTER


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('steps = [5, 50, 100\n', "not valid TOML"),
        ('steps = [5, 50]\nwhatever = 1\n', ":2: whatever: unknown key"),
        ('interval = "soon"\n', ":1: interval:"),
        ('min_sessions = -3\n', ":1: min_sessions"),
        ('rollback_policy = "explode"\n', ":1: rollback_policy"),
        ('steps = "5,50"\n', ":1: steps"),
        ('[[metrics]]\ntolerance = 0.1\n', "metrics[0] needs a name"),
        ('[[metrics]]\nname = "latency_p95"\ndirection = "sideways"\n', "direction"),
    ],
)
def test_a_bad_file_names_the_line_and_field(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "strategy.toml"
    path.write_text(text)
    with pytest.raises(StrategyError) as err:
        load_strategy_file(path, pb.Rollout())
    assert where in str(err.value) and str(path) in str(err.value)


def test_durations_and_weights() -> None:
    assert parse_duration("30s") == 30 and parse_duration("5m") == 300 and parse_duration("7d") == 7 * 86400
    assert parse_duration("250ms") == pytest.approx(0.25)
    with pytest.raises(StrategyError):
        parse_duration("a week")
    assert parse_weights("5,50,100") == [5, 50, 100]
    with pytest.raises(StrategyError):
        parse_weights("5,fifty")
