"""corral rollout / rollback / score: progressive delivery from the command line."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from corral import names
from corral.cli import State, cli, emit, json_option, out, pass_state, to_dict
from corral.registry.v1 import rollouts_pb2 as pb
from corral.strategy import (
    POLICIES,
    PRESETS,
    StrategyError,
    load_strategy_file,
    metric,
    parse_duration,
    parse_weights,
    weights_steps,
)
from corral.telemetry.v1 import telemetry_pb2 as tel

ENDED = (pb.ROLLOUT_STATE_SUCCEEDED, pb.ROLLOUT_STATE_ROLLED_BACK, pb.ROLLOUT_STATE_ABORTED)


def _state(value: int) -> str:
    return pb.RolloutState.Name(value).removeprefix("ROLLOUT_STATE_")


def _rollout_name(agent: str, endpoint: str, rollout_id: str) -> str:
    return f"{names.endpoint_name(agent, endpoint)}/rollouts/{rollout_id}"


@cli.group()
def rollout() -> None:
    """Progressive rollouts of an endpoint to a candidate version, with automatic analysis."""


@rollout.command("start")
@click.argument("agent")
@click.argument("endpoint")
@click.option("--to", "to", required=True, type=int, help="The candidate version.")
@click.option("--strategy", default="canary", show_default=True,
              help=f"A preset ({', '.join(PRESETS)}) or a TOML strategy file.")
@click.option("--steps", help="Explicit weights, e.g. 5,50,100 (an analysis gate after each below 100).")
@click.option("--interval", help="How often the analysis is checked, e.g. 30s.")
@click.option("--min-sessions", type=int, help="Sessions per version before the analysis may pass.")
@click.option("--gate-max", default="1h", show_default=True, help="An inconclusive gate pauses after this long.")
@click.option("--metric", "metrics", multiple=True,
              help="NAME[:TOLERANCE], e.g. session_error_rate:0.01 or score:clinical_accuracy; repeatable.")
@click.option("--on-rollback", type=click.Choice(sorted(POLICIES)), help="What happens to the candidate's sessions.")
@click.option("--webhook", help="URL that receives a JSON POST on every transition.")
@json_option
@pass_state
def rollout_start(state: State, agent: str, endpoint: str, to: int, strategy: str, steps: str | None,
                  interval: str | None, min_sessions: int | None, gate_max: str, metrics: tuple[str, ...],
                  on_rollback: str | None, webhook: str | None) -> None:
    """Start moving ENDPOINT of AGENT from its stable version to --to VERSION."""
    r = pb.Rollout(candidate_version=names.version_name(agent, to))
    try:
        gate_s = parse_duration(gate_max, "--gate-max")
        if strategy in PRESETS:
            r.strategy = strategy
            r.steps.extend(_preset_steps(strategy, gate_s))
        elif Path(strategy).is_file():
            load_strategy_file(Path(strategy), r)
        else:
            raise StrategyError(f"--strategy: {strategy!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
        if steps:
            del r.steps[:]
            r.steps.extend(weights_steps(parse_weights(steps), gate_s))
            r.strategy = "custom"
        if interval:
            r.analysis.interval.FromNanoseconds(int(parse_duration(interval, "--interval") * 1e9))
        for m in metrics:
            r.analysis.metrics.append(_metric_flag(m))
    except StrategyError as exc:
        raise click.BadParameter(str(exc)) from None
    if min_sessions is not None:
        r.analysis.min_sessions = min_sessions
    if on_rollback:
        r.rollback_policy = POLICIES[on_rollback]
    if webhook:
        r.webhook_url = webhook
    created = state.client.rollouts.CreateRollout(
        pb.CreateRolloutRequest(parent=names.endpoint_name(agent, endpoint), rollout=r),
        metadata=state.client.metadata)
    emit(state, to_dict(created), lambda: out.print(created.name))


def _metric_flag(text: str) -> tel.MetricSpec:
    """NAME or NAME:TOLERANCE (score:clinical_accuracy:0.05 works too)."""
    head, sep, tail = text.rpartition(":")
    try:
        return metric(head, float(tail)) if sep else metric(text)
    except ValueError:
        return metric(text)


def _preset_steps(preset: str, gate_s: float) -> list[pb.RolloutStep]:
    weights = {"canary": [10, 100], "linear": list(range(10, 101, 10)), "all-at-once": [100]}[preset]
    return weights_steps([float(w) for w in weights], gate_s)


def _get(state: State, agent: str, endpoint: str, rollout_id: str) -> pb.Rollout:
    return state.client.rollouts.GetRollout(
        pb.GetRolloutRequest(name=_rollout_name(agent, endpoint, rollout_id)), metadata=state.client.metadata)


def _step_text(step: pb.RolloutStep) -> str:
    kind = step.WhichOneof("kind")
    if kind == "set_weight":
        return f"weight {step.set_weight:g}%"
    if kind == "pause":
        return f"pause {step.pause.seconds}s"
    if kind == "analysis":
        return "analysis"
    return "manual gate"


def render(r: pb.Rollout) -> Group:
    head = Text.assemble(
        (r.name, "bold"), "\n",
        ("state ", "dim"), (_state(r.state), "bold green" if r.state == pb.ROLLOUT_STATE_SUCCEEDED else
                            "bold red" if r.state == pb.ROLLOUT_STATE_ROLLED_BACK else "bold"),
        (f" — {r.state_reason}" if r.state_reason else "", "dim"), "\n",
        ("stable ", "dim"), r.stable_version, ("  candidate ", "dim"), r.candidate_version,
        ("  weight ", "dim"), f"{r.current_weight:g}%", "\n",
        ("steps ", "dim"), " → ".join(
            (f"[{_step_text(s)}]" if i == r.current_step else _step_text(s)) for i, s in enumerate(r.steps)),
    )
    table = Table("metric", "baseline", "candidate", "difference [interval]", "tolerance", "verdict", "sessions b/c")
    for c in r.last_analysis.comparisons:
        verdict = tel.Verdict.Name(c.verdict).removeprefix("VERDICT_")
        table.add_row(
            c.metric.name, f"{c.baseline.estimate:.4g}", f"{c.candidate.estimate:.4g}",
            f"{c.difference:+.4g} [{c.ci_low:+.4g}, {c.ci_high:+.4g}]", f"{c.tolerance:.4g}",
            Text(verdict, style={"PASS": "green", "FAIL": "red"}.get(verdict, "yellow")),
            f"{c.baseline.sessions}/{c.candidate.sessions}",
        )
    return Group(head, table) if r.last_analysis.comparisons else Group(head)


@rollout.command("status")
@click.argument("agent")
@click.argument("endpoint")
@click.option("--id", "rollout_id", default="-", help="Which rollout (default: the newest).")
@click.option("--watch", is_flag=True, help="Redraw live until the rollout ends.")
@json_option
@pass_state
def rollout_status(state: State, agent: str, endpoint: str, rollout_id: str, watch: bool) -> None:
    """The state of the newest rollout of ENDPOINT: step, weight, and each metric's evidence."""
    r = _get(state, agent, endpoint, rollout_id)
    if state.json or not watch:
        emit(state, to_dict(r), lambda: out.print(render(r)))
        return
    with Live(render(r), console=out, refresh_per_second=2) as live:
        while r.state not in ENDED:
            time.sleep(1)
            r = _get(state, agent, endpoint, r.name.rsplit("/", 1)[1])
            live.update(render(r))


@rollout.command("list")
@click.argument("agent")
@click.argument("endpoint")
@json_option
@pass_state
def rollout_list(state: State, agent: str, endpoint: str) -> None:
    """Past and present rollouts of ENDPOINT, newest first, with their outcome."""
    rows = state.client.rollouts.ListRollouts(
        pb.ListRolloutsRequest(parent=names.endpoint_name(agent, endpoint), page_size=100),
        metadata=state.client.metadata).rollouts

    def human() -> None:
        t = Table("rollout", "from → to", "state", "weight", "started", "reason")
        for r in rows:
            t.add_row(r.name.rsplit("/", 1)[1], f"v{names.parse_version(r.stable_version).number} → "
                      f"v{names.parse_version(r.candidate_version).number}", _state(r.state),
                      f"{r.current_weight:g}%", r.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M"),
                      r.state_reason)
        out.print(t)

    emit(state, [to_dict(r) for r in rows], human)


def _action(name: str, help_text: str, call: Any, extra: list[Any] | None = None) -> None:
    @rollout.command(name, help=help_text)
    @click.argument("agent")
    @click.argument("endpoint")
    @click.option("--id", "rollout_id", default="-", help="Which rollout (default: the newest).")
    @json_option
    @pass_state
    def command(state: State, agent: str, endpoint: str, rollout_id: str, **kwargs: Any) -> None:
        current = _get(state, agent, endpoint, rollout_id)
        r = call(state, current.name, **kwargs)
        emit(state, to_dict(r), lambda: out.print(render(r)))

    for option in extra or []:
        command = option(command)


_action("promote", "Skip the current gate (--full: straight to 100%).",
        lambda s, n, full: s.client.rollouts.PromoteRollout(pb.PromoteRolloutRequest(name=n, full=full),
                                                           metadata=s.client.metadata),
        [click.option("--full", is_flag=True, help="Straight to 100%.")])
_action("pause", "Hold the rollout where it is.",
        lambda s, n, reason: s.client.rollouts.PauseRollout(pb.PauseRolloutRequest(name=n, reason=reason),
                                                           metadata=s.client.metadata),
        [click.option("--reason", default="", help="Why, for the audit log.")])
_action("resume", "Continue a paused rollout (past a manual or timed-out gate).",
        lambda s, n: s.client.rollouts.ResumeRollout(pb.ResumeRolloutRequest(name=n), metadata=s.client.metadata))
_action("abort", "Stop the rollout and send everything back to the stable version.",
        lambda s, n, reason: s.client.rollouts.AbortRollout(pb.AbortRolloutRequest(name=n, reason=reason),
                                                           metadata=s.client.metadata),
        [click.option("--reason", default="", help="Why, for the audit log.")])


@cli.command()
@click.argument("agent")
@click.argument("endpoint")
@click.option("--to", "to", type=int, help="Roll back to this version (default: the last stable one).")
@click.option("--sessions", "policy", type=click.Choice(sorted(POLICIES)), default="drain", show_default=True,
              help="What happens to the sessions on the version rolled back from.")
@json_option
@pass_state
def rollback(state: State, agent: str, endpoint: str, to: int | None, policy: str) -> None:
    """Set ENDPOINT back to the last version that was stable on it (or --to VERSION), at once."""
    e = state.client.rollouts.RollbackEndpoint(pb.RollbackEndpointRequest(
        name=names.endpoint_name(agent, endpoint), version=names.version_name(agent, to) if to else "",
        session_policy=POLICIES[policy]), metadata=state.client.metadata)
    emit(state, to_dict(e), lambda: out.print(
        f"{e.name}: " + ", ".join(f"v{names.parse_version(t.version).number}={t.percent:g}%" for t in e.traffic)))


SOURCES = {"human": tel.SCORE_SOURCE_HUMAN, "judge": tel.SCORE_SOURCE_JUDGE, "code": tel.SCORE_SOURCE_CODE,
           "user": tel.SCORE_SOURCE_USER}


@cli.command()
@click.argument("session")
@click.argument("name")
@click.argument("value", type=float)
@click.option("--trace", default="", help="Attach to this trace of the session.")
@click.option("--source", type=click.Choice(sorted(SOURCES)), default="human", show_default=True)
@click.option("--comment", default="")
@json_option
@pass_state
def score(state: State, session: str, name: str, value: float, trace: str, source: str, comment: str) -> None:
    """Record a quality score NAME=VALUE on SESSION (a reviewer, a judge, a code check, a user)."""
    s = state.client.telemetry.RecordScore(tel.RecordScoreRequest(score=tel.Score(
        session=names.session_name(session), trace_id=trace, score_name=name, value=value,
        source=SOURCES[source], comment=comment)), metadata=state.client.metadata)
    emit(state, to_dict(s), lambda: out.print(f"{s.score_name}={s.value:g} on {s.session} ({s.version})"))



@cli.command()
@click.option("--session", default="", help="Only this session's scores.")
@click.option("--name", "score_name", default="", help="Only scores with this name.")
@click.option("--limit", default=50, show_default=True)
@json_option
@pass_state
def scores(state: State, session: str, score_name: str, limit: int) -> None:
    """Quality scores recorded in your tenant, newest first."""
    rows = state.client.telemetry.ListScores(tel.ListScoresRequest(
        filter=tel.SpanFilter(session=names.session_name(session) if session else ""), score_name=score_name,
        page_size=limit), metadata=state.client.metadata).scores

    def human() -> None:
        t = Table("session", "score", "value", "source", "version", "by", "comment")
        for s in rows:
            t.add_row(s.session.removeprefix("sessions/"), s.score_name, f"{s.value:g}",
                      tel.ScoreSource.Name(s.source).removeprefix("SCORE_SOURCE_").lower(), s.version, s.user, s.comment)
        out.print(t)

    emit(state, [to_dict(s) for s in rows], human)
