"""Rollout strategy files (TOML) and duration strings, turned into a Rollout message."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf import duration_pb2

from corral.registry.v1 import rollouts_pb2 as pb
from corral.telemetry.v1 import telemetry_pb2 as tel

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
PRESETS = ("canary", "linear", "all-at-once")
POLICIES = {"drain": pb.SESSION_POLICY_DRAIN, "migrate": pb.SESSION_POLICY_MIGRATE, "stop": pb.SESSION_POLICY_STOP}
DIRECTIONS = {"lower_is_better": tel.METRIC_DIRECTION_LOWER_IS_BETTER,
              "higher_is_better": tel.METRIC_DIRECTION_HIGHER_IS_BETTER}


class StrategyError(ValueError):
    """A strategy file or flag is wrong; the message names the line and field."""


def parse_duration(text: str, what: str = "duration") -> float:
    m = _DURATION.match(str(text))
    if not m:
        raise StrategyError(f"{what}: {text!r} is not a duration (e.g. 30s, 5m, 1h, 7d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def weights_steps(weights: list[float], gate_max_s: float) -> list[pb.RolloutStep]:
    steps = []
    for w in weights:
        steps.append(pb.RolloutStep(set_weight=w))
        if w < 100:
            steps.append(pb.RolloutStep(analysis=pb.AnalysisGate(max_duration=duration(gate_max_s))))
    return steps


def parse_weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise StrategyError(f"--steps: {text!r} must be percentages separated by commas, e.g. 5,50,100") from None


def metric(name: str, tolerance: float | None = None, direction: str = "", relative: bool | None = None,
           fail_margin: float | None = None) -> tel.MetricSpec:
    m = tel.MetricSpec(name=name)
    if tolerance is not None:
        m.tolerance = tolerance
    if fail_margin is not None:
        m.fail_margin = fail_margin
    if relative is not None:
        m.relative = relative
    if direction:
        if direction not in DIRECTIONS:
            raise StrategyError(f"direction {direction!r} must be lower_is_better or higher_is_better")
        m.direction = DIRECTIONS[direction]
    return m


def _line_of(text: str, key: str) -> int:
    for i, line in enumerate(text.splitlines(), start=1):
        if re.match(rf"^\s*{re.escape(key)}\s*=", line) or re.match(rf"^\s*\[+\s*{re.escape(key)}\s*\]+", line):
            return i
    return 0


def load_strategy_file(path: Path, rollout: pb.Rollout) -> None:
    """Fills `rollout` from a TOML strategy file (see examples/rollout-strategy.toml)."""
    text = path.read_text()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StrategyError(f"{path}: not valid TOML: {exc}") from None

    def fail(key: str, message: str) -> StrategyError:
        line = _line_of(text, key.split(".")[0].split("[")[0])
        return StrategyError(f"{path}:{line}: {key}: {message}" if line else f"{path}: {key}: {message}")

    known = {"steps", "interval", "min_sessions", "alpha", "gate_max", "rollback_policy", "drain_timeout",
             "webhook", "metrics", "preset"}
    for key in doc:
        if key not in known:
            raise fail(key, f"unknown key (allowed: {', '.join(sorted(known))})")
    gate_max = _duration(doc, "gate_max", fail) or 3600
    if "preset" in doc:
        if doc["preset"] not in PRESETS:
            raise fail("preset", f"{doc['preset']!r} is not one of {', '.join(PRESETS)}")
        rollout.strategy = doc["preset"]
    if "steps" in doc:
        steps = doc["steps"]
        if not isinstance(steps, list) or not all(isinstance(w, (int, float)) for w in steps):
            raise fail("steps", "must be a list of percentages, e.g. [5, 50, 100]")
        rollout.steps.extend(weights_steps([float(w) for w in steps], gate_max))
        rollout.strategy = "custom"
    interval = _duration(doc, "interval", fail)
    if interval:
        rollout.analysis.interval.CopyFrom(duration(interval))
    if "min_sessions" in doc:
        if not isinstance(doc["min_sessions"], int) or doc["min_sessions"] < 0:
            raise fail("min_sessions", "must be a non-negative integer")
        rollout.analysis.min_sessions = doc["min_sessions"]
    if "alpha" in doc:
        rollout.analysis.alpha = float(doc["alpha"])
    if "rollback_policy" in doc:
        if doc["rollback_policy"] not in POLICIES:
            raise fail("rollback_policy", f"{doc['rollback_policy']!r} is not one of {', '.join(POLICIES)}")
        rollout.rollback_policy = POLICIES[doc["rollback_policy"]]
    drain = _duration(doc, "drain_timeout", fail)
    if drain:
        rollout.drain_timeout.CopyFrom(duration(drain))
    if "webhook" in doc:
        rollout.webhook_url = str(doc["webhook"])
    for i, m in enumerate(doc.get("metrics", [])):
        if not isinstance(m, dict) or "name" not in m:
            raise fail("metrics", f"metrics[{i}] needs a name")
        extra = set(m) - {"name", "tolerance", "direction", "relative", "fail_margin"}
        if extra:
            raise fail("metrics", f"metrics[{i}]: unknown key {min(extra)!r}")
        try:
            rollout.analysis.metrics.append(metric(
                m["name"], m.get("tolerance"), m.get("direction", ""), m.get("relative"), m.get("fail_margin")))
        except StrategyError as exc:
            raise fail("metrics", f"metrics[{i}]: {exc}") from None


def _duration(doc: dict[str, Any], key: str, fail: Callable[[str, str], StrategyError]) -> float:
    if key not in doc:
        return 0.0
    try:
        return parse_duration(doc[key], key)
    except StrategyError as exc:
        raise fail(key, str(exc)) from None
