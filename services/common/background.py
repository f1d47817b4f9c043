"""Work a service does beside its calls: loops that run a step now and then until closed, and
detached jobs (a revocation, a webhook) kept referenced until they finish. A failing step is
logged and the loop carries on; closing cancels what is still running and waits for it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """How long to wait before reconnecting: `first_s` after a good connection, doubling up to
    `max_s` while reconnecting keeps failing."""

    first_s: float = 0.1
    max_s: float = 5.0

    def after(self, waited_s: float) -> float:
        return min(waited_s * 2, self.max_s)


class Periodic:
    """Runs `step` every `every_s` seconds, or as soon as woken, until closed."""

    def __init__(
        self,
        step: Callable[[], Awaitable[None]],
        *,
        every_s: float,
        what: str,
        first_delay_s: float = 0.0,
    ) -> None:
        self._step = step
        self.every_s = every_s
        self._what = what
        self._first_delay_s = first_delay_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._what)

    def wake(self) -> None:
        """Runs the next step now rather than at the end of the interval."""
        self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        await self._wait(self._first_delay_s)
        while True:
            try:
                await self._step()
            except Exception:
                log.exception("%s failed; carrying on", self._what)
            await self._wait(self.every_s)

    async def _wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        self._wake.clear()


class TaskSet:
    """Tasks started and not awaited by their caller (a detached job, or a loop of its own); each
    is kept referenced until it finishes, and closing cancels the rest."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, job: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", self._what, exc_info=task.exception())

    async def wait(self, timeout_s: float) -> None:
        """Waits up to `timeout_s` for the running jobs, leaving them running after that."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def close(self) -> None:
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
