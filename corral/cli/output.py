"""How corral commands print: rich tables for people, JSON for scripts (--json), short forms of
resource names for narrow tables, and one way to report a failure and exit with 1."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from rich.console import Console
from rich.table import Table

from corral import names
from corral.cli.options import State
from corral.registry.v1 import registry_pb2 as reg

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

M = TypeVar("M", bound=Message)
V = TypeVar("V", bound=int)


def to_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def emit(state: State, data: object, human: Callable[[], None]) -> None:
    """`data` as JSON under --json, else whatever `human` prints."""
    if state.json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        human()


def emit_message(state: State, msg: Message, human: Callable[[], None]) -> None:
    emit(state, to_dict(msg), human)


def print_table(
    rows: Iterable[M], header: Sequence[str], cells: Callable[[M], Sequence[str]]
) -> None:
    table = Table(*header)
    for row in rows:
        table.add_row(*cells(row))
    out.print(table)


def emit_rows(
    state: State, rows: Sequence[M], header: Sequence[str], cells: Callable[[M], Sequence[str]]
) -> None:
    """A listing: a table of one row per message, or under --json the messages as a list."""
    emit(state, [to_dict(row) for row in rows], lambda: print_table(rows, header, cells))


# -- short forms for tables ------------------------------------------------------------------


def timestamp(ts: Timestamp) -> str:
    return ts.ToDatetime().isoformat(timespec="seconds")


def enum_label(enum: _EnumTypeWrapper[V], value: V) -> str:
    """A value's name without its enum's prefix: ROLLOUT_STATE_ROLLED_BACK → ROLLED_BACK (the
    prefix is the zero value's name less UNSPECIFIED, as every Corral enum declares it)."""
    return enum.Name(value).removeprefix(enum.keys()[0].removesuffix("UNSPECIFIED"))


def short_version(version: str) -> str:
    """agents/a/versions/2 → a v2; anything else as it is."""
    try:
        ref = names.VersionRef.parse(version)
    except names.ResourceNameError:
        return version
    return f"{ref.agent} v{ref.number}"


def version_label(version: str) -> str:
    """agents/a/versions/2 → v2."""
    return f"v{names.VersionRef.parse(version).number}"


def traffic_text(traffic: Iterable[reg.TrafficTarget]) -> str:
    """v1=90%, v2=10%."""
    return ", ".join(f"{version_label(t.version)}={t.percent:g}%" for t in traffic)


# Metrics whose values are not in their own unit but relative to the baseline: the share of
# invocations slower than the baseline's percentile (telemetry's analysis/metrics.py), so their
# differences are differences of shares, not times.
RELATIVE_METRICS = {"latency_p95": "p95", "latency_p99": "p99"}
NO_DATA = "no data"


def metric_label(metric: str) -> str:
    """latency_p95 → latency_p95 (relative); any other metric as it is."""
    return f"{metric} (relative)" if metric in RELATIVE_METRICS else metric


def relative_notes(metrics: Iterable[str]) -> list[str]:
    """What a "(relative)" label means, once for each such metric among `metrics`."""
    return [f"{metric_label(m)}: share of invocations slower than the baseline's "
            f"{RELATIVE_METRICS[m]} (a difference of shares, not of times)"
            for m in dict.fromkeys(metrics) if m in RELATIVE_METRICS]


def figure(value: float, signed: bool = False) -> str:
    """A measured value to 4 significant digits, or "no data" where the window held none (NaN)."""
    if math.isnan(value):
        return NO_DATA
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def with_interval(value: float, low: float, high: float, signed: bool = False) -> str:
    """"value [low, high]"; "no data" for a value from an empty window, and no interval where
    there is not yet evidence enough to bound it."""
    if math.isnan(value):
        return NO_DATA
    if math.isnan(low) or math.isnan(high):
        return f"{figure(value, signed)} (no interval yet)"
    return f"{figure(value, signed)} [{figure(low, signed)}, {figure(high, signed)}]"


def session_id(session: str) -> str:
    """sessions/abc → abc; anything else (an empty name too) as it is."""
    try:
        return names.SessionRef.parse(session).session
    except names.ResourceNameError:
        return session


# -- failures ----------------------------------------------------------------------------------


def _error_info(exc: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The google.rpc.ErrorInfo a Corral service attached to a failed call, if any."""
    try:
        status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    except (AttributeError, ValueError):  # not a call, or one whose status does not match
        return None
    info = error_details_pb2.ErrorInfo()
    for detail in status.details if status is not None else ():
        if detail.Unpack(info):
            return info
    return None


def error_reason(exc: grpc.RpcError) -> str:
    """The ErrorInfo reason of a failed call (VERSION_CANNOT_START, ...); "" without one."""
    info = _error_info(exc)
    return info.reason if info is not None else ""


def reason_metadata(exc: grpc.RpcError) -> dict[str, str]:
    info = _error_info(exc)
    return dict(info.metadata) if info is not None else {}


def rpc_error(exc: grpc.RpcError) -> tuple[str, str]:
    """A refused call's status code name and message, with a hint where the code needs one."""
    try:
        code, details = exc.code().name, exc.details() or ""
    except AttributeError:  # a bare RpcError: the calls' errors carry a status, it has none
        code, details = "UNKNOWN", str(exc)
    if code == "UNAVAILABLE" and not error_reason(exc):  # not a service's answer: none reached
        details += " (is the platform running? start it with `make run`)"
    return code, details


def stack_trace(exc: grpc.RpcError) -> list[str]:
    """The stack trace a failed call carries (google.rpc.DebugInfo): an agent's traceback, its
    frames from the agent's bundle only."""
    # The calls' errors are also grpc.Call objects, which carry the trailers; the type says not.
    trailing: Callable[[], Iterable[tuple[str, str | bytes]] | None] | None = getattr(
        exc, "trailing_metadata", None)
    for key, value in (trailing() if trailing is not None else None) or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                debug = error_details_pb2.DebugInfo()
                if detail.Unpack(debug):
                    return list(debug.stack_entries)
    return []


def rpc_failure(exc: grpc.RpcError) -> NoReturn:
    """A call the platform refused: its status code and message, then the agent's traceback when
    it carries one; as JSON under --json."""
    code, details = rpc_error(exc)
    stack = stack_trace(exc)
    # Raised out of the command, past its State: the command line says whether --json was given.
    if "--json" in sys.argv:
        error: dict[str, object] = {"code": code, "message": details}
        if stack:
            error["traceback"] = stack
        click.echo(json.dumps({"error": error}))
    else:
        err.print(f"[red]error:[/red] {code}: {details}")
        for line in stack:
            err.print(line, markup=False)
    sys.exit(1)


def local_failure(exc: Exception) -> NoReturn:
    err.print(f"[red]error:[/red] {exc}")
    sys.exit(1)
