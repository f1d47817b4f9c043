"""Webhooks: a JSON POST per rollout or experiment transition, retried with tenacity, never
blocking the controller (delivery runs in its own task)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from services.registry.rollouts import Transition

log = logging.getLogger(__name__)
ATTEMPTS = 5


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return isinstance(exc, httpx.TransportError)


def payload(t: Transition) -> dict[str, Any]:
    r = t.rollout
    return {
        "event": t.event,
        "rollout": r.name,
        "kind": r.kind,
        "state": r.state,
        "reason": r.state_reason,
        "stable_version": f"agents/{r.agent}/versions/{r.stable_version}",
        "candidate_version": f"agents/{r.agent}/versions/{r.candidate_version}",
        "weight": r.current_weight,
        "actor": t.actor,
        "evidence": t.evidence,
        "time": datetime.now(UTC).isoformat(),
    }


class WebhookNotifier:
    def __init__(self, lookup_endpoint_url: Any = None, timeout_s: float = 5.0, wait_max_s: float = 10.0) -> None:
        self._client = httpx.AsyncClient(timeout=timeout_s)
        self._tasks: set[asyncio.Task[None]] = set()
        self._wait_max_s = wait_max_s
        self.lookup_endpoint_url = lookup_endpoint_url
        self.delivered = 0

    def __call__(self, t: Transition) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(t))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, t: Transition) -> None:
        url = t.rollout.spec.get("webhook_url") or ""
        if not url and self.lookup_endpoint_url is not None:
            url = await self.lookup_endpoint_url(t.rollout.agent, t.rollout.endpoint)
        if not url:
            return
        body = payload(t)
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_retryable), stop=stop_after_attempt(ATTEMPTS),
                wait=wait_exponential(multiplier=0.2, max=self._wait_max_s), reraise=True,
            ):
                with attempt:
                    response = await self._client.post(url, json=body)
                    response.raise_for_status()
            self.delivered += 1
        except Exception as exc:  # noqa: BLE001 - a failed page is logged, never fatal
            log.warning("webhook %s for %s (%s) failed: %s", url, t.rollout.name, t.event, exc)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        await self._client.aclose()
