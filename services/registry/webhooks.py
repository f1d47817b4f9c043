"""Webhooks: a JSON POST per rollout or experiment transition, retried with tenacity, never
blocking the controller (delivery runs in its own task). Deliveries go only where the outbound
policy allows, to the address it checked; redirects are not followed (a 3xx is a failed delivery)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import httpx
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from corral.names import EndpointRef
from services.common.background import TaskSet
from services.common.outbound import OutboundPolicy, OutboundRefused, Unresolved
from services.common.outbound_http import pinned_client
from services.registry.rollout_model import ExperimentRecord, Transition
from services.registry.store.json_forms import JsonObject, evidence_json

log = logging.getLogger(__name__)
ATTEMPTS = 5
CLOSE_WAIT_S = 2.0

# The webhook an endpoint has configured ("" for none), for runs that name none of their own.
EndpointWebhook = Callable[[str, EndpointRef], Awaitable[str]]


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    # A name that does not resolve may resolve again; a refused address will not change.
    return isinstance(exc, httpx.TransportError | Unresolved)


def payload(t: Transition) -> JsonObject:
    r = t.run
    return {
        "event": t.event,
        "rollout": r.name,
        "tenant": r.tenant,
        "kind": r.kind,
        "state": r.state.value,
        "reason": r.state_reason,
        "stable_version": r.endpoint.parent.version(r.stable_version).name,
        "candidate_version": r.endpoint.parent.version(r.candidate_version).name,
        "weight": 0.0 if isinstance(r, ExperimentRecord) else r.current_weight,
        "actor": t.actor,
        "evidence": evidence_json(t.evidence),
        "time": datetime.now(UTC).isoformat(),
    }


class WebhookNotifier:
    def __init__(
        self, outbound: OutboundPolicy, endpoint_webhook: EndpointWebhook | None = None,
        timeout_s: float = 5.0, wait_max_s: float = 10.0,
    ) -> None:
        self._client = pinned_client(outbound, timeout=timeout_s)
        self._deliveries = TaskSet("webhook delivery")
        self._wait_max_s = wait_max_s
        self._endpoint_webhook = endpoint_webhook
        self.delivered = 0

    def __call__(self, t: Transition) -> None:
        self._deliveries.spawn(self._deliver(t))

    async def _deliver(self, t: Transition) -> None:
        url = t.run.spec.webhook_url
        if not url and self._endpoint_webhook is not None:
            url = await self._endpoint_webhook(t.run.tenant, t.run.endpoint)
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
        except OutboundRefused as exc:
            log.warning("webhook for %s (%s) not delivered: %s", t.run.name, t.event, exc)
        except Exception as exc:  # noqa: BLE001 - a failed page is logged, never fatal
            log.warning("webhook %s for %s (%s) failed: %s", url, t.run.name, t.event, exc)

    async def close(self) -> None:
        await self._deliveries.wait(CLOSE_WAIT_S)
        await self._deliveries.close()
        await self._client.aclose()
