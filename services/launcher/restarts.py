"""When the launcher restarts a process that died: exponential back-off, reset once the process
has stayed up, and the crash-loop rule. Pure: times are passed in (monotonic seconds)."""

from __future__ import annotations

import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    # A process that ran this long before exiting starts again from `first_delay_s`.
    stable_after_s: float = 60.0
    # This many exits within `crash_loop_window_s` is a crash loop: reported, then retried at
    # `max_delay_s` for as long as it lasts (the launcher never gives up on a process).
    crash_loop_exits: int = 5
    crash_loop_window_s: float = 120.0


@dataclass(frozen=True)
class RestartHistory:
    """What the policy remembers of one process: its recent exits and the last delay it chose."""

    exits: tuple[float, ...] = ()
    delay_s: float = 0.0


@dataclass(frozen=True)
class Restart:
    """The decision after an exit: start the process again in `delay_s`."""

    delay_s: float
    # Exits within the crash-loop window, this one included.
    recent_exits: int
    crash_loop: bool


def after_exit(
    policy: RestartPolicy, history: RestartHistory, *, started_at: float, exited_at: float
) -> tuple[Restart, RestartHistory]:
    """The restart for a process started at `started_at` that exited at `exited_at`, and the
    history to pass next time."""
    stable = exited_at - started_at >= policy.stable_after_s
    # A process that stayed up has recovered: the exits before that no longer count.
    earlier = () if stable else history.exits
    exits = (*(t for t in earlier if exited_at - t < policy.crash_loop_window_s), exited_at)
    crash_loop = len(exits) >= policy.crash_loop_exits
    if crash_loop:
        delay = policy.max_delay_s
    elif stable or not history.delay_s:
        delay = policy.first_delay_s
    else:
        delay = min(history.delay_s * 2, policy.max_delay_s)
    return Restart(delay, len(exits), crash_loop), RestartHistory(exits, delay)


def describe_exit(returncode: int) -> str:
    """`returncode` as a person reads it: a negative one is the signal that killed the process."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"
