"""A/B experiments: a fixed split of an endpoint between a control and variants, until a date or
a number of sessions, then concluded by a human with the report's evidence."""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial

from corral.names import EndpointRef, ExperimentRef, VersionRef
from services.common.clock import Clock
from services.common.endpoints import BASIS_POINTS, TrafficShare
from services.common.errors import CorralError, FailedPrecondition, NotFound
from services.common.identity import Caller
from services.common.metric_spec import Direction
from services.common.outbound import OutboundPolicy
from services.common.paging import Page
from services.registry import rollout_rules
from services.registry.model import (
    ExperimentAnalyzer,
    Paging,
    RegistryStore,
    RegistryTx,
    read_page,
)
from services.registry.publishing import check_routable
from services.registry.rollout_model import (
    ExperimentAnalysis,
    ExperimentRecord,
    ExperimentReport,
    ExperimentRequest,
    ExperimentState,
    Notify,
    Transition,
)
from services.registry.rollouts import (
    RunDomain,
    endpoint_not_found,
    run_changed,
    run_in_the_way,
    run_not_found,
    started_just_now,
)
from services.registry.tenancy import tenant_of

log = logging.getLogger(__name__)
CONTROLLER = "corral-controller"


def recommend(report: ExperimentAnalysis) -> tuple[str, str]:
    """(winner, summary): a variant whose effect is on the better side of zero on every metric,
    never when the sample ratio is off or spans of the window are missing."""
    if report.missing_data:
        return "", f"missing data: {report.missing_data}; no winner can be named until it arrives"
    if report.sample_ratio_mismatch:
        return "", (f"sample ratio mismatch (p = {report.sample_ratio_p_value:.2g}): the split is "
                    "not what was configured; no winner can be named")
    better: dict[str, int] = {}
    for m in report.metrics:
        higher = m.metric.direction is Direction.HIGHER_IS_BETTER
        for v in m.variants:
            if v.control:
                continue
            wins = (v.effect_low > 0) if higher else (v.effect_high < 0)
            better[v.version] = better.get(v.version, 0) + (1 if wins else 0)
    winners = [v for v, n in better.items() if n == len(report.metrics) and n > 0]
    if len(winners) == 1:
        return winners[0], f"{winners[0]} beats the control on every metric"
    return "", "no variant beats the control on every metric yet"


async def save(tx: RegistryTx, experiment: ExperimentRecord) -> ExperimentRecord:
    saved = await tx.save_experiment(experiment)
    if saved is None:
        raise run_changed(experiment)
    return saved


class Experiments(RunDomain):
    def __init__(self, store: RegistryStore, notify: Notify, analyzer: ExperimentAnalyzer, *,
                 clock: Clock | None = None, outbound: OutboundPolicy | None = None) -> None:
        super().__init__(store, notify, clock, outbound)
        self._analyzer = analyzer

    async def list_experiments(
        self, endpoint: EndpointRef, paging: Paging
    ) -> Page[ExperimentRecord]:
        rows = partial(self._store.list_experiments, tenant_of(paging.who), endpoint)
        return await read_page(paging, "ListExperiments", endpoint, (int,), rows, key=lambda e: (e.id,))

    async def create(
        self, caller: Caller, endpoint: EndpointRef, request: ExperimentRequest
    ) -> ExperimentRecord:
        now = self.clock.now()
        spec, traffic = rollout_rules.experiment_spec(endpoint, request, now)
        await self.check_webhook(spec.webhook_url, "experiment.webhook_url")
        tenant = tenant_of(caller)
        async with self._store.tx() as tx:
            current = await tx.get_endpoint(tenant, endpoint, for_update=True)
            if current is None:
                raise endpoint_not_found(endpoint)
            await check_routable(tx, tenant, endpoint.parent, [v.version for v in spec.variants])
            running = await tx.active_run(tenant, endpoint)
            if running is not None:
                raise run_in_the_way(running, endpoint)
            record = await tx.insert_experiment(tenant, endpoint, spec, caller.user, now)
            if record is None:
                raise started_just_now(endpoint)
            await tx.put_endpoint(tenant, endpoint, traffic)
            await tx.audit(caller, "CreateExperiment", record.name,
                           {"variants": {str(v.version): v.percent for v in spec.variants}})
        self._notify(Transition(record, "STARTED", caller.user))
        return record

    async def get(self, caller: Caller, experiment: ExperimentRef) -> ExperimentRecord:
        record = await self._store.get_experiment(tenant_of(caller), experiment)
        if record is None:
            raise run_not_found(experiment)
        return record

    async def analyze(self, r: ExperimentRecord) -> ExperimentAnalysis:
        """Telemetry's analysis of the experiment since its split started."""
        return await self._analyzer.analyze_experiment(
            r.tenant, r.endpoint, r.spec, r.traffic_start_time or r.create_time, r.end_time or self.clock.now()
        )

    async def report(self, caller: Caller, experiment: ExperimentRef) -> ExperimentReport:
        record = await self.get(caller, experiment)
        analysis = await self.analyze(record)
        winner, summary = recommend(analysis)
        return ExperimentReport(record, analysis, winner, summary)

    async def conclude(
        self, caller: Caller, experiment: ExperimentRef, winner: VersionRef | None,
        keep_control: bool,
    ) -> ExperimentRecord:
        """Ends the experiment on the winner (or the control), with the analysis as evidence."""
        rollout_rules.check_conclusion(winner, keep_control)
        seen = await self.get(caller, experiment)
        try:
            evidence = await self.analyze(seen)
        except CorralError:
            evidence = ExperimentAnalysis(error="telemetry unavailable when concluding")
        async with self._store.tx() as tx:
            # The endpoint before the experiment, as everywhere.
            await tx.get_endpoint(seen.tenant, experiment.endpoint, for_update=True)
            r = await tx.get_experiment(seen.tenant, experiment, for_update=True)
            if r is None:
                raise NotFound(f"{experiment.name} does not exist")
            if r.state is ExperimentState.CONCLUDED:
                raise FailedPrecondition(f"{r.name} was already concluded", reason="EXPERIMENT_ENDED")
            chosen = rollout_rules.chosen_winner(r.spec, r.name, winner)
            await tx.put_endpoint(r.tenant, r.endpoint, (TrafficShare(chosen, BASIS_POINTS),))
            outcome = "kept the control" if keep_control else f"winner v{chosen}"
            updated = await save(tx, replace(
                r, state=ExperimentState.CONCLUDED, spec=replace(r.spec, winner=chosen),
                end_time=self.clock.now(), state_reason=f"concluded by {caller.user}: {outcome}",
            ))
            await tx.audit(caller, "ConcludeExperiment", r.name,
                           {"winner": chosen, "keep_control": keep_control, "evidence": evidence})
        self._notify(Transition(updated, "CONCLUDED", caller.user, evidence))
        return updated

    async def sessions_seen(self, r: ExperimentRecord) -> int:
        """How many sessions the experiment saw, when it stops at a number of them (else 0)."""
        if not r.spec.max_sessions:
            return 0
        return sum((await self.analyze(r)).sessions)

    async def check_complete(self, r: ExperimentRecord, sessions: int) -> ExperimentRecord | None:
        """RUNNING → COMPLETE when its end time passed or it saw max_sessions; the split stays
        until someone concludes it."""
        now = self.clock.now()
        ended = r.spec.end_time is not None and now >= r.spec.end_time
        if not ended and not (r.spec.max_sessions and sessions >= r.spec.max_sessions):
            return None
        async with self._store.tx() as tx:
            current = await tx.get_experiment(r.tenant, r.ref, for_update=True)
            if current is None or current.state is not ExperimentState.RUNNING:
                return None
            reason = "reached its end time" if ended else f"reached {sessions} sessions"
            updated = await save(tx, replace(current, state=ExperimentState.COMPLETE,
                                             state_reason=reason))
        self._notify(Transition(updated, "COMPLETE", CONTROLLER))
        return updated
