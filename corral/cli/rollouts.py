"""corral rollout, rollback: progressive delivery of an endpoint to a candidate version, with
automatic analysis, and the way back."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import click
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from corral import names
from corral.cli.options import NEWEST_OR_NUMBER, State, endpoint_command
from corral.cli.output import (
    emit_message,
    emit_rows,
    enum_label,
    figure,
    metric_label,
    out,
    relative_notes,
    traffic_text,
    version_label,
    with_interval,
)
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
_PRESET_WEIGHTS = {"canary": [10, 100], "linear": list(range(10, 101, 10)), "all-at-once": [100]}


@click.group()
def rollout() -> None:
    """Progressive rollouts of an endpoint to a candidate version, with automatic analysis."""


@endpoint_command(rollout.command("start"))
@click.option("--to", "to", required=True, type=int, help="The candidate version.")
@click.option("--strategy", default="canary", show_default=True,
              help=f"A preset ({', '.join(PRESETS)}) or a TOML strategy file.")
@click.option("--steps",
              help="Explicit weights, e.g. 5,50,100 (an analysis gate after each below 100).")
@click.option("--interval", help="How often the analysis is checked, e.g. 30s.")
@click.option("--min-sessions", type=int,
              help="Sessions per version before the analysis may pass.")
@click.option("--gate-max", default="1h", show_default=True,
              help="An inconclusive gate pauses after this long.")
@click.option("--metric", "metrics", multiple=True,
              help="NAME[:TOLERANCE], e.g. session_error_rate:0.01 or score:clinical_accuracy; "
                   "repeatable.")
@click.option("--on-rollback", type=click.Choice(sorted(POLICIES)),
              help="What happens to the candidate's sessions.")
@click.option("--webhook", help="URL that receives a JSON POST on every transition.")
def rollout_start(state: State, target: names.EndpointRef, to: int, strategy: str,
                  steps: str | None, interval: str | None, min_sessions: int | None,
                  gate_max: str, metrics: tuple[str, ...], on_rollback: str | None,
                  webhook: str | None) -> None:
    """Start moving ENDPOINT of AGENT from its stable version to --to VERSION."""
    r = pb.Rollout(candidate_version=target.parent.version(to).name)
    try:
        gate_s = parse_duration(gate_max, "--gate-max")
        if strategy in PRESETS:
            r.strategy = strategy
            r.steps.extend(weights_steps([float(w) for w in _PRESET_WEIGHTS[strategy]], gate_s))
        elif Path(strategy).is_file():
            load_strategy_file(Path(strategy), r)
        else:
            raise StrategyError(
                f"--strategy: {strategy!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
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
    created = state.client.create_rollout(target, r)
    emit_message(state, created, lambda: out.print(created.name))


def _metric_flag(text: str) -> tel.MetricSpec:
    """NAME or NAME:TOLERANCE (score:clinical_accuracy:0.05 works too)."""
    head, sep, tail = text.rpartition(":")
    try:
        return metric(head, float(tail)) if sep else metric(text)
    except ValueError:
        return metric(text)


def _step_text(step: pb.RolloutStep) -> str:
    kind = step.WhichOneof("kind")
    if kind == "set_weight":
        return f"weight {step.set_weight:g}%"
    if kind == "pause":
        return f"pause {step.pause.seconds}s"
    if kind == "analysis":
        return "analysis"
    return "manual gate"


def _state_style(state: pb.RolloutState.ValueType) -> str:
    if state == pb.ROLLOUT_STATE_SUCCEEDED:
        return "bold green"
    if state == pb.ROLLOUT_STATE_ROLLED_BACK:
        return "bold red"
    return "bold"


def render(r: pb.Rollout) -> Group:
    head = Text.assemble(
        (r.name, "bold"), "\n",
        ("state ", "dim"), (enum_label(pb.RolloutState, r.state), _state_style(r.state)),
        (f" — {r.state_reason}" if r.state_reason else "", "dim"), "\n",
        ("stable ", "dim"), r.stable_version, ("  candidate ", "dim"), r.candidate_version,
        ("  weight ", "dim"), f"{r.current_weight:g}%", "\n",
        ("steps ", "dim"), " → ".join(
            (f"[{_step_text(s)}]" if i == r.current_step else _step_text(s))
            for i, s in enumerate(r.steps)),
    )
    if not r.last_analysis.comparisons:
        return Group(head)
    table = Table("metric", "baseline", "candidate", "difference \\[interval]", "tolerance",
                  "verdict", "sessions b/c")
    for c in r.last_analysis.comparisons:
        verdict = enum_label(tel.Verdict, c.verdict)
        table.add_row(
            metric_label(c.metric.name), figure(c.baseline.estimate), figure(c.candidate.estimate),
            with_interval(c.difference, c.ci_low, c.ci_high, signed=True), figure(c.tolerance),
            Text(verdict, style={"PASS": "green", "FAIL": "red"}.get(verdict, "yellow")),
            f"{c.baseline.sessions}/{c.candidate.sessions}",
        )
    notes = relative_notes(c.metric.name for c in r.last_analysis.comparisons)
    return Group(head, table, *(Text(note, style="dim") for note in notes))


def _show(state: State, r: pb.Rollout) -> None:
    emit_message(state, r, lambda: out.print(render(r)))


_ID = click.option("--id", "rollout_id", default="-", type=NEWEST_OR_NUMBER,
                   help="Which rollout (default: the newest).")
_REASON = click.option("--reason", default="", help="Why, for the audit log.")


RolloutAction = Callable[..., None]
Decorator = Callable[[click.Command], click.Command]


def _on_one_rollout(name: str, *options: Decorator) -> Callable[[RolloutAction], click.Command]:
    """`corral rollout NAME AGENT ENDPOINT [--id ID] [OPTIONS]`: the decorated function gets the
    rollout, resolved ("-" has become the newest's own id), and the values of `options`."""

    def decorate(act: RolloutAction) -> click.Command:
        @endpoint_command(rollout.command(name, help=act.__doc__))
        @_ID
        def command(state: State, /, target: names.EndpointRef, rollout_id: int | None,
                    **values: object) -> None:
            current = state.client.get_rollout(names.RolloutRef(target, rollout_id))
            act(state, names.RolloutRef.parse(current.name), **values)

        for option in options:
            command = option(command)
        return command

    return decorate


@_on_one_rollout("promote", click.option(
    "--full", is_flag=True, help="Straight to 100%: the rollout succeeds at once."))
def rollout_promote(state: State, target: names.RolloutRef, full: bool) -> None:
    """Skip the current gate or pause, without waiting for the analysis: the next weight is set
    at once (also when paused). The only way past an analysis gate that has not passed.
    --full: the candidate gets 100% and the rollout succeeds."""
    _show(state, state.client.promote_rollout(target, full=full))


@_on_one_rollout("pause", _REASON)
def rollout_pause(state: State, target: names.RolloutRef, reason: str) -> None:
    """Hold the rollout at its current step and weight: nothing moves and no gate passes until
    `resume` or `promote`. Sessions keep going to the candidate at that weight."""
    _show(state, state.client.pause_rollout(target, reason=reason))


@_on_one_rollout("resume")
def rollout_resume(state: State, target: names.RolloutRef) -> None:
    """Continue a paused rollout at the step it was held at, whose time starts over. A pending
    analysis gate is evaluated again and must pass before the weight moves (an inconclusive one
    pauses again after its maximum duration); a manual gate is passed. To skip an analysis gate,
    use `promote`."""
    _show(state, state.client.resume_rollout(target))


@_on_one_rollout("abort", _REASON)
def rollout_abort(state: State, target: names.RolloutRef, reason: str) -> None:
    """Stop the rollout and send everything back to the stable version."""
    _show(state, state.client.abort_rollout(target, reason=reason))


@endpoint_command(rollout.command("status"))
@_ID
@click.option("--watch", is_flag=True,
              help="Follow the rollout until it ends: redrawn on a terminal, else a line per "
                   "change.")
def rollout_status(state: State, target: names.EndpointRef, rollout_id: int | None,
                   watch: bool) -> None:
    """The state of the newest rollout of ENDPOINT: step, weight, and each metric's evidence."""
    r = state.client.get_rollout(names.RolloutRef(target, rollout_id))
    if state.json or not watch:
        _show(state, r)
        return
    # Watched by its own id: a newer rollout started meanwhile is not this one.
    watched = names.RolloutRef.parse(r.name)
    if not out.is_terminal:
        # Piped or redirected: no redrawing (Live would print only when the rollout ends), but a
        # plain line, flushed, each time the rollout changes.
        _watch_lines(state, watched, r)
        return
    with Live(render(r), console=out, refresh_per_second=2) as live:
        while r.state not in ENDED:
            time.sleep(1)
            r = state.client.get_rollout(watched)
            live.update(render(r))


def progress_line(r: pb.Rollout) -> str:
    """A rollout's progress on one line: state, weight, step and each metric's verdict."""
    step = (f"step {r.current_step + 1}/{len(r.steps)} {_step_text(r.steps[r.current_step])}"
            if r.current_step < len(r.steps) else "steps done")
    parts = [r.name, enum_label(pb.RolloutState, r.state), f"weight {r.current_weight:g}%", step]
    parts += [f"{metric_label(c.metric.name)} {enum_label(tel.Verdict, c.verdict)}"
              for c in r.last_analysis.comparisons]
    if r.state_reason:
        parts.append(r.state_reason)
    return " | ".join(parts)


def _watch_lines(state: State, watched: names.RolloutRef, r: pb.Rollout) -> None:
    shown = ""
    while True:
        line = progress_line(r)
        if line != shown:
            click.echo(f"{datetime.now(UTC).isoformat(timespec='seconds')} {line}")  # flushes
            shown = line
        if r.state in ENDED:
            return
        time.sleep(1)
        r = state.client.get_rollout(watched)


@endpoint_command(rollout.command("list"))
def rollout_list(state: State, target: names.EndpointRef) -> None:
    """Past and present rollouts of ENDPOINT, newest first, with their outcome."""
    emit_rows(
        state, state.client.list_rollouts(target),
        ("rollout", "from → to", "state", "weight", "started", "reason"),
        lambda r: (str(names.RolloutRef.parse(r.name).id),
                   f"{version_label(r.stable_version)} → {version_label(r.candidate_version)}",
                   enum_label(pb.RolloutState, r.state), f"{r.current_weight:g}%",
                   r.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M"), r.state_reason),
    )


@endpoint_command(click.command())
@click.option("--to", "to", type=int,
              help="Roll back to this version (default: the last stable one).")
@click.option("--sessions", "policy", type=click.Choice(sorted(POLICIES)), default="drain",
              show_default=True,
              help="What happens to the sessions on the version rolled back from.")
def rollback(state: State, target: names.EndpointRef, to: int | None, policy: str) -> None:
    """Set ENDPOINT back to the last version that was stable on it (or --to VERSION), at once."""
    e = state.client.rollback_endpoint(
        target, target.parent.version(to) if to else None, POLICIES[policy])
    emit_message(state, e, lambda: out.print(f"{e.name}: {traffic_text(e.traffic)}"))


COMMANDS: tuple[click.Command, ...] = (rollout, rollback)
