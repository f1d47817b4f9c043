"""The rollout controller: a background loop in every registry replica. Each tick it takes every
running rollout whose advisory lock it can get (so exactly one replica drives a rollout) and
applies at most one step, in the same transaction as the rollout's progress."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

from services.registry.rollout_store import RolloutRecord, RolloutStore
from services.registry.rollouts import Rollouts, Transition, now
from services.registry.store import RegistryStore, Tx

log = logging.getLogger(__name__)
TICK_S = 1.0
SYSTEM = "corral-controller"

# (rollout, window start) -> the analysis as a dict with "verdict" PASS / FAIL / INCONCLUSIVE.
Analyze = Callable[[RolloutRecord], Awaitable[Mapping[str, Any]]]
# Called after a rollback commits, to apply a session policy (the rollout's own when None) to the
# candidate's sessions.
SessionPolicy = Callable[[RolloutRecord, str | None], Awaitable[None]]


class RolloutController:
    def __init__(
        self, store: RegistryStore, rollouts: RolloutStore, domain: Rollouts, analyze: Analyze,
        apply_policy: SessionPolicy, tick_s: float = TICK_S,
    ) -> None:
        self.store = store
        self.rollouts = rollouts
        self.domain = domain
        self.analyze = analyze
        self.apply_policy = apply_policy
        self.tick_s = tick_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        domain.kick = self._wake.set

    def watch_experiments(self, experiments: Any, analyze: Callable[[RolloutRecord], Awaitable[Any]],
                          every_s: float = 10.0) -> None:
        """Marks running experiments COMPLETE when they reach their end time or session count."""
        self._experiments = experiments
        self._analyze_experiment = analyze
        self._experiment_every_s = every_s
        self._experiment_checked: dict[str, float] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("rollout controller tick failed; carrying on")
            try:
                await asyncio.wait_for(self._wake.wait(), self.tick_s)
            except TimeoutError:
                pass
            self._wake.clear()

    async def tick(self) -> None:
        await self._stop_drained()
        for record in await self.rollouts.active(self.store.pool):
            if record.kind == "experiment" and record.state == "RUNNING":
                await self._check_experiment(record)
                continue
            if record.kind != "rollout" or record.state != "PROGRESSING":
                continue
            try:
                await self.advance(record)
            except Exception:
                log.exception("could not advance %s", record.name)

    async def _stop_drained(self) -> None:
        """Drain policy: the candidate's sessions finished on it; after drain_timeout, stop the rest."""
        for r in await self.rollouts.due_drains(self.store.pool):
            async with self.store.tx() as tx:
                if not await self.rollouts.try_lock(tx.conn, r):
                    continue
                current = await self.rollouts.get(tx.conn, r.agent, r.endpoint, "rollout", r.id, for_update=True)
                if current is None or current.spec.get("drained"):
                    continue
                await self.rollouts.update(tx.conn, current, spec={**current.spec, "drained": True})
            await self.apply_policy(current, "STOP")

    async def _check_experiment(self, r: RolloutRecord) -> None:
        if getattr(self, "_experiments", None) is None:
            return
        last = self._experiment_checked.get(r.name, 0.0)
        loop = asyncio.get_running_loop()
        if loop.time() - last < self._experiment_every_s:
            return
        self._experiment_checked[r.name] = loop.time()
        try:
            sessions = 0
            if r.spec.get("max_sessions"):
                report = await self._analyze_experiment(r)
                sessions = sum(report.sessions)
            await self._experiments.check_complete(r, sessions)
        except Exception:
            log.warning("could not check experiment %s", r.name, exc_info=True)

    async def advance(self, seen: RolloutRecord) -> RolloutRecord | None:
        """Applies at most one step of one rollout. Returns the new record, or None if another
        replica holds it or nothing changed."""
        transition: Transition | None = None
        rolled_back: RolloutRecord | None = None
        async with self.store.tx() as tx:
            if not await self.rollouts.try_lock(tx.conn, seen):
                return None
            # The endpoint row before the rollout's: the order every endpoint writer takes them
            # in (rollback, manual set), so a step racing them cannot deadlock.
            await tx.endpoint_for_update(seen.agent, seen.endpoint)
            r = await self.rollouts.get(tx.conn, seen.agent, seen.endpoint, "rollout", seen.id, for_update=True)
            if r is None or r.state != "PROGRESSING":
                return None
            steps = r.spec["steps"]
            if r.current_step >= len(steps):
                updated = await self.domain.finish(tx, r, "every step done")
                transition = Transition(updated, "SUCCEEDED", SYSTEM)
            else:
                updated, transition, rolled_back = await self._step(tx, r, steps[r.current_step])
            if transition is not None:
                await tx.audit("system", SYSTEM, f"Rollout:{transition.event}", r.name, {
                    "step": r.current_step, "weight": updated.current_weight,
                    "reason": updated.state_reason, "evidence": transition.evidence,
                })
        if transition is not None:
            log.info("%s: %s (%s)", transition.rollout.name, transition.event, transition.rollout.state_reason)
            self.domain.notify(transition)
        if rolled_back is not None:
            await self.apply_policy(rolled_back, None)
        if updated is not r:
            self._wake.set()  # more may be due at once (e.g. a weight step right after a gate)
        return updated

    async def _step(
        self, tx: Tx, r: RolloutRecord, step: Mapping[str, Any]
    ) -> tuple[RolloutRecord, Transition | None, RolloutRecord | None]:
        elapsed = (now() - r.step_start_time).total_seconds()
        if "set_weight" in step:
            weight = float(step["set_weight"])
            if weight >= 100:
                done = await self.domain.finish(tx, r, "promoted to 100%")
                return done, Transition(done, "SUCCEEDED", SYSTEM, r.last_analysis), None
            updated = await self.domain.set_weight(tx, r, weight, r.current_step + 1)
            return updated, Transition(updated, "WEIGHT_SET", SYSTEM), None
        if "pause_s" in step:
            if elapsed >= float(step["pause_s"]):
                updated = await self.rollouts.update(tx.conn, r, current_step=r.current_step + 1, step_start_time=now())
                return updated, None, None
            return r, None, None
        if "manual" in step:
            updated = await self.rollouts.update(tx.conn, r, state="PAUSED", state_reason="waiting for a human to resume")
            return updated, Transition(updated, "PAUSED", SYSTEM), None
        # An analysis gate, checked once per interval.
        interval = float(r.spec["analysis"]["interval_s"])
        if r.last_check_time is not None and now() - r.last_check_time < timedelta(seconds=interval):
            return r, None, None
        analysis = dict(await self.analyze(r))
        verdict = analysis.get("verdict", "INCONCLUSIVE")
        if verdict == "FAIL":
            reason = "analysis failed: " + _failing(analysis)
            updated = await self.domain.end_on_stable(tx, r, "ROLLED_BACK", reason, analysis)
            return updated, Transition(updated, "ROLLED_BACK", SYSTEM, analysis), updated
        if verdict == "PASS":
            updated = await self.rollouts.update(
                tx.conn, r, last_analysis=analysis, last_check_time=now(),
                current_step=r.current_step + 1, step_start_time=now(), state_reason="analysis passed",
            )
            return updated, Transition(updated, "ANALYSIS_PASSED", SYSTEM, analysis), None
        if elapsed >= float(step["analysis"]["max_duration_s"]):
            reason = f"analysis inconclusive after {elapsed:.0f}s (step maximum); waiting for a human"
            updated = await self.rollouts.update(
                tx.conn, r, last_analysis=analysis, last_check_time=now(), state="PAUSED", state_reason=reason)
            return updated, Transition(updated, "PAUSED", SYSTEM, analysis), None
        updated = await self.rollouts.update(tx.conn, r, last_analysis=analysis, last_check_time=now(),
                                             state_reason="analysis inconclusive; waiting for more sessions")
        return updated, None, None


def _failing(analysis: Mapping[str, Any]) -> str:
    parts = []
    for c in analysis.get("comparisons", []):
        if c.get("verdict") == "FAIL":
            parts.append(f"{c['metric']['name']} {c.get('explanation', '')}".strip())
    return "; ".join(parts) or "the candidate is worse than the stable version"
