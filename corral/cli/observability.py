"""corral traces, spans, metrics, score, scores, audit: what happened, how well, and who
changed what."""

from __future__ import annotations

import json

import click
from google.protobuf import json_format

from corral import names
from corral.cli.options import State, json_option, pass_state
from corral.cli.output import (
    emit,
    emit_message,
    emit_rows,
    enum_label,
    out,
    print_table,
    session_id,
    short_version,
    timestamp,
    to_dict,
)
from corral.telemetry.v1 import telemetry_pb2 as tel

SOURCES = {"human": tel.SCORE_SOURCE_HUMAN, "judge": tel.SCORE_SOURCE_JUDGE,
           "code": tel.SCORE_SOURCE_CODE, "user": tel.SCORE_SOURCE_USER}


def _span_status(value: tel.SpanStatus.ValueType) -> str:
    # OpenTelemetry leaves successful spans UNSET; to a reader that is "ok".
    return "error" if value == tel.SPAN_STATUS_ERROR else "ok"


def _filter(agent: str, version: str, endpoint: str, session: str, errors: bool) -> tel.SpanFilter:
    f = tel.SpanFilter(errors_only=errors)
    if agent:
        ref = names.AgentRef(agent)
        f.agent = ref.name
        if version:
            f.version = ref.version(int(version)).name if version.isdigit() else version
        if endpoint:
            f.endpoint = ref.endpoint(endpoint).name
    if session:
        f.session = names.session_name(session)
    return f


@click.command()
@click.option("--agent", default="")
@click.option("--version", "version", default="", help="Version number (needs --agent).")
@click.option("--endpoint", default="", help="Endpoint id (needs --agent).")
@click.option("--session", default="")
@click.option("--errors", is_flag=True, help="Only failed invocations.")
@click.option("--limit", default=20, show_default=True)
@json_option
@pass_state
def traces(
    state: State, agent: str, version: str, endpoint: str, session: str, errors: bool, limit: int
) -> None:
    """Recent invocations' traces, newest first."""
    if (version or endpoint) and not agent:
        raise click.UsageError("--version and --endpoint need --agent")
    emit_rows(
        state, state.client.traces(_filter(agent, version, endpoint, session, errors), limit),
        ("trace", "started", "version", "session", "ms", "status", "spans"),
        lambda r: (r.trace_id, r.start_time.ToDatetime().strftime("%H:%M:%S"),
                   short_version(r.version), session_id(r.session), f"{r.duration_ms:.1f}",
                   _span_status(r.status), str(r.span_count)),
    )


@click.command()
@click.argument("trace_id")
@json_option
@pass_state
def spans(state: State, trace_id: str) -> None:
    """The spans of one trace."""
    rows = state.client.spans(tel.SpanFilter(trace_id=trace_id), 1000)
    # Tables read in start order; the JSON keeps the service's order.
    by_start = sorted(rows, key=lambda r: r.start_time.ToNanoseconds())

    def table() -> None:
        print_table(
            by_start, ("span", "service", "ms", "status", "parent"),
            lambda r: (r.name, r.service, f"{r.duration_ms:.2f}", _span_status(r.status),
                       r.parent_span_id or "-"),
        )
        for span in by_start:
            _print_exceptions(span)

    emit(state, [to_dict(r) for r in rows], table)


def _print_exceptions(span: tel.Span) -> None:
    """A span's `exception` events: the type and message, then the traceback it carries."""
    for event in span.events:
        if event.name != "exception":
            continue
        fields = event.attributes.fields
        kind = fields["exception.type"].string_value if "exception.type" in fields else "?"
        message = fields["exception.message"].string_value if "exception.message" in fields else ""
        out.print(f"\n[red]exception[/red] in {span.name} ({span.span_id}): {kind}: {message}")
        if "exception.stacktrace" in fields:
            out.print(fields["exception.stacktrace"].string_value.rstrip("\n"), markup=False)


@click.command()
@click.argument("agent")
@json_option
@pass_state
def metrics(state: State, agent: str) -> None:
    """Per-version invocations, errors, latency percentiles, tool calls and tokens of AGENT."""
    rows = state.client.metrics(agent)
    # Percentiles are listed even when 0, which MessageToDict would leave out.
    data = [to_dict(m) | {"latency_p50_ms": m.latency_p50_ms, "latency_p95_ms": m.latency_p95_ms,
                          "latency_p99_ms": m.latency_p99_ms} for m in rows]
    emit(state, data, lambda: print_table(
        rows,
        ("version", "calls", "errors", "err %", "sessions", "p50 ms", "p95 ms", "p99 ms",
         "tool calls", "tool fail %", "tokens in/out", "cost $"),
        lambda m: (short_version(m.version), str(m.invocations), str(m.errors),
                   f"{m.error_rate:.1%}", str(m.sessions), f"{m.latency_p50_ms:.1f}",
                   f"{m.latency_p95_ms:.1f}", f"{m.latency_p99_ms:.1f}", str(m.tool_calls),
                   f"{m.tool_failure_rate:.1%}", f"{m.input_tokens}/{m.output_tokens}",
                   f"{m.cost_usd:.4f}" + ("*" if m.unpriced_models else "")),
    ))


@click.command()
@click.argument("session")
@click.argument("name")
@click.argument("value", type=float)
@click.option("--trace", default="", help="Attach to this trace of the session.")
@click.option("--source", type=click.Choice(sorted(SOURCES)), default="human", show_default=True)
@click.option("--comment", default="")
@json_option
@pass_state
def score(
    state: State, session: str, name: str, value: float, trace: str, source: str, comment: str
) -> None:
    """Record a quality score NAME=VALUE on SESSION (a reviewer, a judge, a code check, a user)."""
    s = state.client.record_score(tel.Score(
        session=names.session_name(session), trace_id=trace, score_name=name, value=value,
        source=SOURCES[source], comment=comment))
    emit_message(state, s, lambda: out.print(
        f"{s.score_name}={s.value:g} on {s.session} ({s.version})"))


@click.command()
@click.option("--session", default="", help="Only this session's scores.")
@click.option("--name", "score_name", default="", help="Only scores with this name.")
@click.option("--limit", default=50, show_default=True)
@json_option
@pass_state
def scores(state: State, session: str, score_name: str, limit: int) -> None:
    """Quality scores recorded in your tenant, newest first."""
    session_name = names.session_name(session) if session else ""
    emit_rows(
        state, state.client.scores(session_name, score_name, limit),
        ("session", "score", "value", "source", "version", "by", "comment"),
        lambda s: (session_id(s.session), s.score_name, f"{s.value:g}",
                   enum_label(tel.ScoreSource, s.source).lower(),
                   s.version, s.user, s.comment),
    )


@click.command()
@click.option("--resource", default="", help="Only changes to this resource (name prefix).")
@click.option("--limit", default=50, show_default=True)
@json_option
@pass_state
def audit(state: State, resource: str, limit: int) -> None:
    """Who changed what, when: newest first."""
    emit_rows(
        state, state.client.audit(resource, limit),
        ("time", "who", "what", "resource", "details"),
        lambda e: (timestamp(e.time), f"{e.user}@{e.tenant}", e.method, e.resource,
                   json.dumps(json_format.MessageToDict(e.details))),
    )


COMMANDS: tuple[click.Command, ...] = (traces, spans, metrics, score, scores, audit)
