"""The launcher's restart rules and its supervisor: back-off that doubles up to a cap and resets
once a process stayed up, a crash loop reported with the process's last lines, restarts that
fail counted as exits, and a stopping launcher restarting nothing."""

from __future__ import annotations

import logging
import signal

import pytest

from services.launcher.restarts import (
    Restart,
    RestartHistory,
    RestartPolicy,
    after_exit,
    describe_exit,
)
from services.launcher.supervisor import Interrupted, Supervisor

pytestmark = pytest.mark.timeout(20)

POLICY = RestartPolicy()


def exits(*runs: float, policy: RestartPolicy = POLICY) -> list[Restart]:
    """The decisions for a process that ran `runs[i]` seconds each time, restarted when told."""
    history, now, decisions = RestartHistory(), 1000.0, []
    for ran in runs:
        restart, history = after_exit(policy, history, started_at=now, exited_at=now + ran)
        decisions.append(restart)
        now += ran + restart.delay_s
    return decisions


def test_back_off_doubles_from_half_a_second_to_thirty() -> None:
    slow = RestartPolicy(crash_loop_exits=100)
    assert [r.delay_s for r in exits(*[1.0] * 9, policy=slow)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_back_off_starts_over_once_the_process_stayed_up_a_minute() -> None:
    delays = [r.delay_s for r in exits(1, 1, 1, 60, 1)]
    assert delays == [0.5, 1, 2, 0.5, 1]


def test_five_exits_within_two_minutes_is_a_crash_loop_retried_at_the_cap() -> None:
    decisions = exits(1, 1, 1, 1, 1, 1)
    assert [r.crash_loop for r in decisions] == [False] * 4 + [True, True]
    assert [r.recent_exits for r in decisions] == [1, 2, 3, 4, 5, 6]
    assert decisions[4].delay_s == decisions[5].delay_s == 30


def test_exits_spread_over_more_than_two_minutes_are_no_crash_loop() -> None:
    # Each run lasts 50 s (not long enough to reset the back-off): only 2-3 exits per window.
    decisions = exits(*[50.0] * 8)
    assert not any(r.crash_loop for r in decisions)


def test_a_process_that_stayed_up_is_out_of_its_crash_loop() -> None:
    decisions = exits(1, 1, 1, 1, 1, 70)
    assert decisions[4].crash_loop and not decisions[5].crash_loop
    assert decisions[5].delay_s == 0.5 and decisions[5].recent_exits == 1


def test_exit_statuses_read_as_a_person_reads_them() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(-200) == "killed by signal 200"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeChild:
    """A process that dies when told; `failures` restarts fail before one succeeds."""

    def __init__(self, name: str, failures: int = 0, interrupt: bool = False) -> None:
        self.name = name
        self.status: str | None = None
        self.starts = 0
        self.failures = failures
        self.interrupt = interrupt

    def exit_status(self) -> str | None:
        return self.status

    def start(self) -> str:
        self.starts += 1
        if self.interrupt:
            raise Interrupted
        if self.failures:
            self.failures -= 1
            raise RuntimeError("exited with code 1 while starting")
        self.status = None
        return "serving on 127.0.0.1:5"

    def last_lines(self) -> list[str]:
        return ["Traceback (most recent call last):", "ValueError: bad setting"]


def test_a_dead_process_is_reported_and_restarted_after_its_back_off(caplog: pytest.LogCaptureFixture) -> None:
    clock, router, sessions = Clock(), FakeChild("router"), FakeChild("sessions")
    supervisor = Supervisor([router, sessions], {"router": 0, "sessions": 0}, clock=clock)
    clock.now = 10
    router.status = "killed by SIGKILL"
    with caplog.at_level(logging.WARNING):
        supervisor.check()
        clock.now = 10.4
        supervisor.check()
        assert router.starts == 0, "restarted before its back-off"
        clock.now = 10.5
        supervisor.check()
    assert router.starts == 1 and sessions.starts == 0
    assert "router exited (killed by SIGKILL) after 10.0s; restarting it in 0.5s" in caplog.text
    assert "router restarted: serving on 127.0.0.1:5" in caplog.text


def test_a_crash_loop_is_reported_with_the_last_lines_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    clock, executor = Clock(), FakeChild("executor", failures=100)
    supervisor = Supervisor([executor], {"executor": 0}, clock=clock)
    executor.status = "exit code 1"
    with caplog.at_level(logging.WARNING):
        for _ in range(300):
            supervisor.check()
            clock.now += 0.25
    loop = [r for r in caplog.records if "crash-looping" in r.getMessage()]
    assert loop and loop[0].levelno == logging.ERROR
    message = loop[0].getMessage()
    assert "executor is crash-looping: 5 exits in 120s" in message
    assert "did not restart (exited with code 1 while starting)" in message
    assert "restarting it every 30s" in message and "ValueError: bad setting" in message
    # After 0.5, 1, 2 and 4 s, then every 30 s: it keeps trying.
    assert executor.starts == 6


def test_a_stopping_launcher_restarts_nothing_more() -> None:
    clock, registry = Clock(), FakeChild("registry", interrupt=True)
    supervisor = Supervisor([registry], {"registry": 0}, clock=clock)
    registry.status = "exit code 0"
    supervisor.check()
    clock.now = 1
    with pytest.raises(Interrupted):
        supervisor.check()
