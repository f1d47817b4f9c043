"""The registry's pure rules (update masks, uploads, rollout specs) and the JSON forms its store
writes: no sockets, no database."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from corral.bundle import BundleLimits
from corral.names import VersionRef
from services.common.endpoints import TrafficShare
from services.common.errors import InvalidArgument
from services.common.metric_spec import Direction
from services.registry import rollout_model as ro
from services.registry.rollout_rules import rollout_spec, validate_steps
from services.registry.rules import BundleUpload, UploadHeader, audit_prefix, update_paths
from services.registry.store import json_forms

ROOT = Path(__file__).resolve().parents[2]

CANDIDATE = VersionRef("support", 2)


def fields(err: pytest.ExceptionInfo[InvalidArgument]) -> list[str]:
    return [v.field for v in err.value.violations]


# -- update masks ------------------------------------------------------------------------------


def test_an_update_mask_names_only_fields_that_can_change() -> None:
    mutable = ("traffic", "description")
    assert update_paths(["description"], mutable, mutable) == {"description"}
    assert update_paths([], mutable, mutable) == {"traffic", "description"}
    assert update_paths([], mutable, ["traffic"]) == {"traffic"}
    with pytest.raises(InvalidArgument) as unknown:
        update_paths(["traffic", "salt"], mutable, mutable)
    assert fields(unknown) == ["update_mask"] and "'salt' cannot be changed" in unknown.value.message
    with pytest.raises(InvalidArgument) as nothing:
        update_paths([], mutable, [])
    assert "nothing to change" in nothing.value.message


# -- uploads -----------------------------------------------------------------------------------


def test_an_upload_is_a_header_then_chunks_within_the_limit() -> None:
    header = UploadHeader("agents/support", "", 6, "")
    upload = BundleUpload(BundleLimits(packed_bytes=10, unpacked_bytes=100))
    with pytest.raises(InvalidArgument) as first:
        upload.chunk(b"abc")
    assert "must be the first message" in first.value.message
    upload.header(header)
    with pytest.raises(InvalidArgument):
        upload.header(header)
    upload.chunk(b"abc")
    upload.chunk(b"def")
    assert upload.finish() == (header, b"abcdef")  # not a tar: publishing reports that
    with pytest.raises(InvalidArgument) as big:
        upload.chunk(b"12345")
    assert big.value.reason == "BUNDLE_TOO_LARGE" and big.value.metadata["packed_bytes"] == "11"
    with pytest.raises(InvalidArgument) as empty:
        BundleUpload(BundleLimits()).finish()
    assert fields(empty) == ["header"]


# -- rollout specs -----------------------------------------------------------------------------


def test_a_rollout_spec_fills_in_the_defaults() -> None:
    spec = rollout_spec(ro.RolloutRequest(CANDIDATE, strategy="linear"))
    assert spec.strategy == "linear" and len(spec.steps) == 19 and spec.steps[-1] == ro.SetWeight(100)
    assert spec.analysis == ro.AnalysisConfig(
        (ro.MetricSpec("session_error_rate"), ro.MetricSpec("invocation_error_rate"), ro.MetricSpec("latency_p95")),
        30, 100, 0.05,
    )
    assert (spec.rollback_policy, spec.drain_timeout_s) == (ro.SessionPolicy.DRAIN, 3600)
    explicit = rollout_spec(ro.RolloutRequest(CANDIDATE, steps=(ro.SetWeight(5), ro.AnalysisGate(0), ro.SetWeight(100))))
    assert explicit.steps[1] == ro.AnalysisGate(3600)


def test_the_readme_states_the_default_minimum_sessions_a_rollout_applies() -> None:
    applied = rollout_spec(ro.RolloutRequest(CANDIDATE)).analysis.min_sessions
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"at least `--min-sessions` per version (default {applied})" in readme


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (ro.RolloutRequest(CANDIDATE, strategy="yolo"), "rollout.strategy"),
        (ro.RolloutRequest(CANDIDATE, interval_s=0), "rollout.analysis.interval"),
        (ro.RolloutRequest(CANDIDATE, min_sessions=-1), "rollout.analysis.min_sessions"),
        (ro.RolloutRequest(CANDIDATE, alpha=2), "rollout.analysis.alpha"),
        (ro.RolloutRequest(CANDIDATE, metrics=(ro.MetricSpec("latency_p95"),) * 2), "metrics[1].name"),
        (ro.RolloutRequest(CANDIDATE, metrics=(ro.MetricSpec("score:x", fail_margin=-1),)),
         "metrics[0].fail_margin"),
    ],
)
def test_a_bad_rollout_request_names_its_field(request_: ro.RolloutRequest, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        rollout_spec(request_)
    assert fields(err) == [field]


@pytest.mark.parametrize(
    ("steps", "field", "words"),
    [
        ((), "rollout.steps", "at least one"),
        ((ro.SetWeight(50), ro.SetWeight(30), ro.SetWeight(100)), "rollout.steps[1].set_weight", "does not increase"),
        ((ro.SetWeight(150),), "rollout.steps[0].set_weight", "<= 100"),
        ((ro.Pause(0), ro.SetWeight(100)), "rollout.steps[0].pause", "positive"),
        ((ro.AnalysisGate(-1), ro.SetWeight(100)), "rollout.steps[0].analysis.max_duration", "positive"),
        ((ro.SetWeight(50), ro.ManualGate()), "rollout.steps", "must end at set_weight 100"),
    ],
)
def test_bad_steps_name_the_step(steps: tuple[ro.SetWeight, ...], field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_steps(steps)
    assert fields(err) == [field] and words in err.value.message


# -- JSON forms --------------------------------------------------------------------------------

ANALYSIS = ro.Analysis(
    ro.Verdict.FAIL,
    (
        ro.Comparison(
            ro.MetricSpec("session_error_rate", Direction.LOWER_IS_BETTER, tolerance=0.01),
            ro.ArmStats("agents/support/versions/1", 200, 310, 0.01, 0.0, 0.02),
            ro.ArmStats("agents/support/versions/2", 200, 305, 0.33, 0.27, 0.39),
            0.32, 0.25, 0.39, 0.01, ro.Verdict.FAIL, "0.33 > 0.01",
        ),
        ro.Comparison(ro.MetricSpec("score:quality"), None, None, math.nan, -math.inf, math.inf, 0.0,
                   ro.Verdict.INCONCLUSIVE, "no score:quality values"),
    ),
    datetime(2030, 1, 2, 3, 4, 5, 600000, tzinfo=UTC),
)


def test_an_analysis_is_written_as_telemetry_prints_it_and_read_back() -> None:
    text = json_forms.dumps(ANALYSIS)
    doc = json.loads(text)  # strict JSON: no NaN or Infinity tokens
    assert doc["verdict"] == "FAIL" and doc["evaluate_time"] == "2030-01-02T03:04:05.600000Z"
    first = doc["comparisons"][0]
    assert first["metric"] == {"name": "session_error_rate",
                               "direction": "METRIC_DIRECTION_LOWER_IS_BETTER", "tolerance": 0.01}
    assert first["candidate"]["sessions"] == "200" and first["verdict"] == "FAIL"
    assert doc["comparisons"][1]["difference"] == "NaN"
    back = json_forms.analysis_from_json(text)
    assert back.comparisons[0] == ANALYSIS.comparisons[0] and back.verdict is ro.Verdict.FAIL
    assert math.isnan(back.comparisons[1].difference) and back.comparisons[1].ci_high == math.inf
    assert ANALYSIS.failing() == "session_error_rate 0.33 > 0.01"


def test_an_analysis_stored_before_the_values_still_reads() -> None:
    stored = json.dumps({
        "verdict": "INCONCLUSIVE", "comparisons": [], "error": "telemetry: UNAVAILABLE: refused",
    })
    assert json_forms.analysis_from_json(stored) == ro.Analysis(
        ro.Verdict.INCONCLUSIVE, error="telemetry: UNAVAILABLE: refused")


def test_specs_keep_their_stored_shape() -> None:
    spec = ro.RolloutSpec(
        "custom", (ro.SetWeight(10), ro.Pause(30), ro.AnalysisGate(600), ro.ManualGate(), ro.SetWeight(100)),
        ro.AnalysisConfig((ro.MetricSpec("latency_p95", Direction.HIGHER_IS_BETTER, relative=True),),
                       30, 100, 0.05),
        ro.SessionPolicy.MIGRATE, 3600, "https://hooks.example/x", drained=True,
    )
    text = json_forms.rollout_spec_json(spec)
    doc = json.loads(text)
    # The controller's SQL reads these by name.
    assert (doc["rollback_policy"], doc["drain_timeout_s"], doc["drained"]) == ("MIGRATE", 3600, True)
    assert doc["steps"][1] == {"pause_s": 30} and doc["steps"][3] == {"manual": {}}
    assert json_forms.rollout_spec_from_json(text) == spec

    experiment = ro.ExperimentSpec(
        (TrafficShare(2, 8000), TrafficShare(1, 2000)), (ro.MetricSpec("latency_p95"),),
        datetime(2030, 2, 1, tzinfo=UTC), 500, 0.05, "", winner=1,
    )
    text = json_forms.experiment_spec_json(experiment)
    assert json.loads(text)["variants"] == [[2, 80.0], [1, 20.0]]
    assert json_forms.experiment_spec_from_json(text) == experiment


def test_experiment_evidence_leaves_out_what_is_unset() -> None:
    assert json_forms.evidence_json(ro.ExperimentAnalysis(error="telemetry unavailable")) == {
        "error": "telemetry unavailable"}
    assert json_forms.evidence_json(ro.ExperimentAnalysis(sessions=(10, 12))) == {"sessions": ["10", "12"]}
    assert json_forms.evidence_json(None) is None


def test_an_audit_prefix_is_no_longer_than_a_resource_name() -> None:
    assert audit_prefix("agents/a/endpoints/") == "agents/a/endpoints/"
    with pytest.raises(InvalidArgument) as info:
        audit_prefix("a" * 1_000_000)
    assert [v.field for v in info.value.violations] == ["resource_prefix"]
    assert len(str(info.value)) < 200
