"""An agent's output and traceback, piece by piece: the worker's capture and traceback, the
executor's bound, the error's DebugInfo, telemetry's conversion, budget and listing (on the fake
store), and `corral logs --since`."""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import threading
import traceback
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath

import click
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from corral.cli.logs import since_time
from corral.names import AgentRef
from corral.sandbox.v1 import sandbox_pb2 as pb
from corral.sdk._http_runtime import ServerOutput
from corral.sdk._output import MAX_INVOCATION_BYTES, OutputCapture
from corral.sdk._runtime import agent_traceback
from corral.sdk._server_traceback import server_traceback
from services.common.errors import Internal
from services.common.status import MAX_STACK, to_status
from services.executor.model import AgentLogLine
from services.executor.output import InvocationOutput
from services.telemetry import otlp
from services.telemetry.log_model import LogFilter
from services.telemetry.logs import AgentLogs
from services.telemetry.otlp_logs import log_batch
from tests.fakes.telemetry import FakeLogStore
from tests.otlp import logs_request

# -- inside the sandbox ------------------------------------------------------------------------


def _capture() -> tuple[OutputCapture, list[pb.Logs]]:
    sent: list[pb.Logs] = []
    return OutputCapture(sent.append, threading.RLock()), sent


def test_a_line_that_starts_with_a_logging_level_has_that_severity() -> None:
    """An HTTP agent's server logs through its own process: only its text reaches the sandbox."""
    capture, _ = _capture()
    capture.begin()
    capture.write("stderr", "INFO:root:started\nERROR:app:failed\nINFO:     127.0.0.1 - GET /ping 200\n")
    capture.write("stderr", "WARNING [app] slow\nInformation only\nplain stderr\n")
    capture.write("stdout", "DEBUG: details\nplain stdout\n")
    capture.end()
    logs = capture.take()
    assert logs is not None
    assert [r.severity_text for r in logs.records] == [
        "INFO", "ERROR", "INFO", "WARN", "WARN", "WARN", "DEBUG", "INFO"]


def test_output_becomes_one_record_a_line_with_partial_lines_kept_to_the_end() -> None:
    capture, _ = _capture()
    capture.begin()
    capture.write("stdout", "one\ntw")
    capture.write("stdout", "o\n")
    capture.write("stderr", "no newline")
    capture.log("app.db", 40, "failed")
    capture.end()
    logs = capture.take()
    assert logs is not None
    assert [(r.source, r.severity_text, r.body) for r in logs.records] == [
        ("stdout", "INFO", "one"), ("stdout", "INFO", "two"), ("app.db", "ERROR", "failed"),
        ("stderr", "WARN", "no newline"),
    ]
    assert capture.take() is None


def test_an_invocations_output_past_its_bound_is_counted_not_kept() -> None:
    capture, _ = _capture()
    capture.begin()
    line = "x" * 1023 + "\n"
    for _ in range(100):
        capture.write("stdout", line)
    capture.end()
    logs = capture.take()
    assert logs is not None
    assert sum(len(r.body) for r in logs.records) <= MAX_INVOCATION_BYTES
    assert len(logs.records) == MAX_INVOCATION_BYTES // 1024  # a line and its newline
    assert logs.dropped_bytes == (100 - len(logs.records)) * 1024
    capture.begin()  # the next invocation starts afresh
    capture.write("stdout", "again\n")
    capture.end()
    assert [r.body for r in capture.take().records] == ["again"]  # type: ignore[union-attr]


def test_a_traceback_keeps_the_bundles_frames_and_the_exceptions_chain(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "mod.py").write_text(
        "def inner():\n    return 1 / 0\n\n"
        "def outer():\n    try:\n        inner()\n    except ZeroDivisionError as exc:\n"
        "        raise ValueError('bad input') from exc\n"
    )
    spec = importlib.util.spec_from_file_location("bundled_mod", bundle / "mod.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ValueError) as raised:
        module.outer()
    text = agent_traceback(raised.value, bundle)
    assert text.splitlines() == [
        "Traceback (most recent call last):",
        '  File "mod.py", line 6, in outer',
        "    inner()",
        '  File "mod.py", line 2, in inner',
        "    return 1 / 0",
        "ZeroDivisionError: division by zero",
        "",
        "The above exception was the direct cause of the following exception:",
        "",
        "Traceback (most recent call last):",
        '  File "mod.py", line 8, in outer',
        "    raise ValueError('bad input') from exc",
        "ValueError: bad input",
    ]
    assert __file__ not in text  # this test's own frame is not the bundle's


# -- the executor ------------------------------------------------------------------------------


def _line(body: str, source: str = "stdout") -> AgentLogLine:
    return AgentLogLine(1, source, 9, "INFO", body)


def test_the_executor_bounds_what_the_worker_sends_and_says_what_it_dropped() -> None:
    output = InvocationOutput(limit=12)
    output.take([_line("12345"), _line("67890"), _line("overflow")], dropped_bytes=100)
    lines = output.lines()
    assert [line.body for line in lines[:2]] == ["12345", "67890"]
    assert lines[2].source == "corral" and "109 more bytes were dropped" in lines[2].body
    # An agent's logger named like the platform's notes is told apart from them.
    forged = InvocationOutput()
    forged.take([_line("I am the platform", source="corral")], 0)
    assert [line.source for line in forged.lines()] == ["agent.corral"]


def test_an_errors_stack_travels_as_debug_info_bounded_to_its_last_lines() -> None:
    stack = "\n".join(f"line {i} " + "y" * 90 for i in range(100))
    status = to_status(Internal("the agent raised", stack=stack), "executor")
    assert status.code == grpc.StatusCode.INTERNAL
    details = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    debug = error_details_pb2.DebugInfo()
    assert any(d.Unpack(debug) for d in details.details)
    entries = list(debug.stack_entries)
    assert entries[-1].startswith("line 99 ") and entries[0].endswith("earlier lines left out)")
    assert sum(len(e.encode()) + 1 for e in entries[1:]) <= MAX_STACK


# -- telemetry ---------------------------------------------------------------------------------


def test_a_tenants_own_export_lands_in_its_tenant_whatever_it_claims() -> None:
    platform = log_batch(logs_request("acme", "agents/a", "i1", "hello"), otlp.Exporter("default", trusted=True))
    assert [(r.tenant, r.agent, r.invocation_id, r.source, r.platform) for r in platform.rows] == [
        ("acme", "agents/a", "i1", "stdout", True)]
    user = otlp.Exporter("mallory", trusted=False, user="m")
    forged = log_batch(logs_request("acme", "agents/a", "i1", "hello"), user)
    assert [(r.tenant, r.platform) for r in forged.rows] == [("mallory", False)]


async def test_an_invocation_keeps_its_budget_over_every_export_and_tenants_stay_apart() -> None:
    logs = AgentLogs(FakeLogStore())
    trusted = otlp.Exporter("default", trusted=True)
    line = "z" * 1023  # 1 KiB with its newline
    for _ in range(3):  # 3 exports of 30 KiB for one invocation
        await logs.export(log_batch(logs_request("acme", "agents/a", "i1", *[line] * 30), trusted))
    await logs.export(log_batch(logs_request("other", "agents/a", "i1", "another tenant's"), trusted))
    page = await logs.list_logs("acme", LogFilter(AgentRef("a")), 1000, "")
    bodies = [r.body for r in page.items]
    assert bodies.count(line) == 64 and bodies[-1].startswith("[output truncated")
    assert len([b for b in bodies if b.startswith("[output truncated")]) == 1
    assert "another tenant's" not in bodies
    assert [r.body for r in (await logs.list_logs("other", LogFilter(AgentRef("a")), 0, "")).items] \
        == ["another tenant's"]
    # The follow token continues after the last record, even on the last page.
    await logs.export(log_batch(logs_request("acme", "agents/a", "i2", "later"), trusted))
    later = await logs.list_logs("acme", LogFilter(AgentRef("a")), 1000, page.follow_token)
    assert [r.body for r in later.items] == ["later"]


def test_since_is_a_duration_back_from_now() -> None:
    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    assert since_time("10m", now) == now - timedelta(minutes=10)
    assert since_time("2h", now) == now - timedelta(hours=2)
    with pytest.raises(click.BadParameter, match="30s, 10m, 2h or 1d"):
        since_time("yesterday", now)


# -- an http agent's server, read by the bridge -------------------------------------------------


def _server_output() -> tuple[ServerOutput, list[pb.Logs], int]:
    """A ServerOutput reading a pipe's read end (on a thread, as the bridge does); the write
    end is returned for the test to write as the server would."""
    capture, sent = _capture()
    output = ServerOutput(capture, collections.deque(maxlen=8))
    read_end, write_end = os.pipe()
    output.watch(read_end, "stderr")
    return output, sent, write_end


def test_server_lines_written_during_an_invocation_are_its_and_idle_lines_are_not(
    capfd: pytest.CaptureFixture[str],
) -> None:
    output, _, pipe = _server_output()
    os.write(pipe, b"starting up\n")
    output.settle()
    output.begin()
    os.write(pipe, b"handling\nhalf a li")
    os.write(pipe, b"ne\nno newline")
    output.settle()  # the bridge's wait after the response: what was written is read by now
    output.capture.end()
    os.write(pipe, b"idle\n")
    output.settle()
    logs = output.capture.take()
    assert logs is not None
    assert [r.body for r in logs.records] == ["handling", "half a line", "no newline"]
    assert capfd.readouterr().err == "starting up\nidle\n"


def test_a_servers_output_past_the_invocations_bound_is_counted() -> None:
    output, _, pipe = _server_output()
    output.begin()
    line = b"x" * 1023 + b"\n"
    for _ in range(MAX_INVOCATION_BYTES // len(line) + 3):
        os.write(pipe, line)
    output.settle()
    output.capture.end()
    kept, dropped = 0, 0
    while (logs := output.capture.take()) is not None:
        kept += sum(len(r.body) + 1 for r in logs.records)
        dropped += logs.dropped_bytes
    assert kept == MAX_INVOCATION_BYTES and dropped == 3 * len(line)


def _raise_from_the_bundle() -> list[str]:
    def invoke() -> None:
        raise RuntimeError("asked to fail")

    try:
        try:
            invoke()
        except RuntimeError as exc:
            raise ValueError("wrapped") from exc
    except ValueError as exc:
        return traceback.format_exception(exc)
    raise AssertionError("unreachable")


def test_a_servers_printed_traceback_keeps_the_bundles_frames_only() -> None:
    here = PurePosixPath(__file__).parent
    printed = "".join(_raise_from_the_bundle()).splitlines()
    stderr = ["INFO: request", *printed, "INFO: 500 Internal Server Error"]
    text = server_traceback(stderr, here)
    assert text.splitlines()[0] == "Traceback (most recent call last):"
    assert '  File "test_agent_output.py"' in text and "in invoke" in text
    assert "The above exception was the direct cause" in text
    assert text.rstrip().endswith("ValueError: wrapped")

    # The bundle's deps/ and the interpreter's files are not the author's code; carets go too.
    printed = """Traceback (most recent call last):
  File "/bundle/deps/bedrock_agentcore/runtime/app.py", line 600, in _handle
    result = handler(payload)
  File "/bundle/app.py", line 51, in invoke
    raise RuntimeError("asked to fail")
    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/usr/lib/python3.11/threading.py", line 9, in run
    self.go()
RuntimeError: asked to fail"""
    assert server_traceback(printed.splitlines(), PurePosixPath("/bundle")) == """\
Traceback (most recent call last):
  File "app.py", line 51, in invoke
    raise RuntimeError("asked to fail")
RuntimeError: asked to fail
"""


def test_a_json_log_lines_stack_trace_is_the_traceback_and_no_traceback_is_empty() -> None:
    here = PurePosixPath(__file__).parent
    entry = json.dumps({"level": "ERROR", "stackTrace": _raise_from_the_bundle()})
    text = server_traceback(['{"level": "INFO"}', entry], here)
    assert text.rstrip().endswith("ValueError: wrapped") and '"test_agent_output.py"' in text
    assert server_traceback(["just a line", "{not json"], here) == ""
