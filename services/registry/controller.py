"""The rollout controller: a background loop in every registry replica. Each tick it takes every
running rollout whose advisory lock it can get (so exactly one replica drives a rollout) and
applies at most one step, in the same transaction as the rollout's progress. It also marks
experiments complete, and stops the sessions a drained rollback left behind."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import timedelta

from services.common.background import Periodic
from services.common.errors import CorralError
from services.registry.experiments import Experiments
from services.registry.model import RegistryStore, RegistryTx, VersionAnalysis
from services.registry.rollout_model import (
    Analysis,
    AnalysisGate,
    ExperimentRecord,
    ExperimentState,
    ManualGate,
    Pause,
    RolloutRecord,
    RolloutState,
    SessionPolicy,
    SetWeight,
    Step,
    Transition,
    Verdict,
)
from services.registry.rollouts import Rollouts, save
from services.registry.tenancy import acting_for

log = logging.getLogger(__name__)
TICK_S = 1.0
EXPERIMENT_CHECK_S = 10.0
SYSTEM = "corral-controller"

# A step's outcome: the rollout after it, the transition to announce, and the rollout whose
# candidate was rolled back (its session policy runs once the transaction has committed).
StepOutcome = tuple[RolloutRecord, Transition | None, RolloutRecord | None]


class RolloutController:
    def __init__(
        self,
        store: RegistryStore,
        rollouts: Rollouts,
        experiments: Experiments,
        analysis: VersionAnalysis,
        *,
        tick_s: float = TICK_S,
        experiment_check_s: float = EXPERIMENT_CHECK_S,
    ) -> None:
        self._store, self._rollouts, self._experiments = store, rollouts, experiments
        self._analysis = analysis
        self._experiment_check_s = experiment_check_s
        self._experiment_checked: dict[str, float] = {}
        self._clock = rollouts.clock
        self._loop = Periodic(self.tick, every_s=tick_s, what="rollout controller tick")

    def start(self) -> None:
        self._loop.start()

    def wake(self) -> None:
        """Runs the next tick now (a rollout was created or changed)."""
        self._loop.wake()

    async def stop(self) -> None:
        await self._loop.close()

    async def tick(self) -> None:
        await self._stop_drained()
        for run in await self._store.active_runs():
            if isinstance(run, ExperimentRecord):
                if run.state is ExperimentState.RUNNING:
                    await self._check_experiment(run)
                continue
            if run.state is not RolloutState.PROGRESSING:
                continue
            try:
                await self.advance(run)
            except Exception:
                log.exception("could not advance %s", run.name)

    async def _stop_drained(self) -> None:
        """Drain policy: the candidate's sessions finished on it; after drain_timeout, stop the rest."""
        for r in await self._store.due_drains():
            async with self._store.tx() as tx:
                if not await tx.try_lock_run(r):
                    continue
                current = await tx.get_rollout(r.tenant, r.ref, for_update=True)
                if current is None or current.spec.drained:
                    continue
                await save(tx, replace(current, spec=replace(current.spec, drained=True)))
            await self._rollouts.after_rollback(current, SessionPolicy.STOP)

    async def _check_experiment(self, r: ExperimentRecord) -> None:
        last = self._experiment_checked.get(f"{r.tenant}/{r.name}", 0.0)
        if time.monotonic() - last < self._experiment_check_s:
            return
        self._experiment_checked[f"{r.tenant}/{r.name}"] = time.monotonic()
        try:
            sessions = await self._experiments.sessions_seen(r)
            await self._experiments.check_complete(r, sessions)
        except Exception:
            log.warning("could not check experiment %s", r.name, exc_info=True)

    async def advance(self, seen: RolloutRecord) -> RolloutRecord | None:
        """Applies at most one step of one rollout. Returns the new record, or None if another
        replica holds it or nothing changed."""
        transition: Transition | None = None
        rolled_back: RolloutRecord | None = None
        async with self._store.tx() as tx:
            if not await tx.try_lock_run(seen):
                return None
            # The endpoint row before the rollout's: the order every endpoint writer takes them
            # in (rollback, manual set), so a step racing them cannot deadlock.
            await tx.get_endpoint(seen.tenant, seen.endpoint, for_update=True)
            r = await tx.get_rollout(seen.tenant, seen.ref, for_update=True)
            if r is None or r.state is not RolloutState.PROGRESSING:
                return None
            steps = r.spec.steps
            if r.current_step >= len(steps):
                updated = await self._rollouts.finish(tx, r, "every step done")
                transition = Transition(updated, "SUCCEEDED", SYSTEM)
            else:
                updated, transition, rolled_back = await self._step(tx, r, steps[r.current_step])
            if transition is not None:
                await tx.audit(acting_for(r.tenant), f"Rollout:{transition.event}", r.name, {
                    "step": r.current_step, "weight": updated.current_weight,
                    "reason": updated.state_reason, "evidence": transition.evidence,
                })
        if transition is not None:
            log.info("%s: %s (%s)", transition.run.name, transition.event, transition.run.state_reason)
            self._rollouts.announce(transition)
        if rolled_back is not None:
            await self._rollouts.after_rollback(rolled_back)
        if updated is not r:
            self.wake()  # more may be due at once (e.g. a weight step right after a gate)
        return updated

    async def _step(self, tx: RegistryTx, r: RolloutRecord, step: Step) -> StepOutcome:
        now = self._clock.now()
        elapsed = (now - r.step_start_time).total_seconds()
        match step:
            case SetWeight(percent=weight):
                if weight >= 100:
                    done = await self._rollouts.finish(tx, r, "promoted to 100%")
                    return done, Transition(done, "SUCCEEDED", SYSTEM, r.last_analysis), None
                updated = await self._rollouts.set_weight(tx, r, weight, r.current_step + 1)
                return updated, Transition(updated, "WEIGHT_SET", SYSTEM), None
            case Pause(seconds=seconds):
                if elapsed >= seconds:
                    updated = await save(tx, replace(r, current_step=r.current_step + 1,
                                                     step_start_time=now))
                    return updated, None, None
                return r, None, None
            case ManualGate():
                updated = await save(tx, replace(r, state=RolloutState.PAUSED,
                                                 state_reason="waiting for a human to resume"))
                return updated, Transition(updated, "PAUSED", SYSTEM), None
            case AnalysisGate(max_duration_s=max_duration_s):
                return await self._gate(tx, r, elapsed, max_duration_s)

    async def _gate(
        self, tx: RegistryTx, r: RolloutRecord, elapsed: float, max_duration_s: float
    ) -> StepOutcome:
        """An analysis gate, checked once per interval."""
        now = self._clock.now()
        interval = timedelta(seconds=r.spec.analysis.interval_s)
        if r.last_check_time is not None and now - r.last_check_time < interval:
            return r, None, None
        analysis = await self._analyze(r)
        if analysis.verdict is Verdict.FAIL:
            reason = "analysis failed: " + analysis.failing()
            updated = await self._rollouts.end_on_stable(
                tx, r, RolloutState.ROLLED_BACK, reason, analysis)
            return updated, Transition(updated, "ROLLED_BACK", SYSTEM, analysis), updated
        if analysis.verdict is Verdict.PASS:
            updated = await save(tx, replace(
                r, last_analysis=analysis, last_check_time=now, current_step=r.current_step + 1,
                step_start_time=now, state_reason="analysis passed",
            ))
            return updated, Transition(updated, "ANALYSIS_PASSED", SYSTEM, analysis), None
        if elapsed >= max_duration_s:
            reason = f"analysis inconclusive after {elapsed:.0f}s (step maximum); waiting for a human"
            if analysis.missing_data:
                reason += f"; missing data: {analysis.missing_data}"
            updated = await save(tx, replace(
                r, last_analysis=analysis, last_check_time=now, state=RolloutState.PAUSED,
                state_reason=reason,
            ))
            return updated, Transition(updated, "PAUSED", SYSTEM, analysis), None
        waiting = (f"missing data: {analysis.missing_data}" if analysis.missing_data
                   else "waiting for more sessions")
        updated = await save(tx, replace(
            r, last_analysis=analysis, last_check_time=now,
            state_reason=f"analysis inconclusive; {waiting}",
        ))
        return updated, None, None

    async def _analyze(self, r: RolloutRecord) -> Analysis:
        """Telemetry's comparison since the candidate started receiving traffic. A telemetry that
        cannot answer is inconclusive, never a fail."""
        try:
            return await self._analysis.compare_versions(
                r.tenant, r.endpoint, r.stable_version, r.candidate_version, r.spec.analysis,
                r.traffic_start_time or r.create_time, self._clock.now(),
            )
        except CorralError as exc:
            log.warning("analysis of %s unavailable: %s", r.name, exc.message)
            return Analysis(Verdict.INCONCLUSIVE, error=f"telemetry: {exc.reason}: {exc.message}")
