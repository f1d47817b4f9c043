"""Rollout state, weight and analysis verdicts as Prometheus metrics, beside telemetry's
per-version metrics, so one dashboard shows a rollout and the numbers it decides on. Labels
follow services/common/prometheus.py: the tenant, the agent and endpoint ids, the run's kind and
id (`rollout`), and for the weight the candidate's number (`version`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from services.common.prometheus import Family, Snapshot
from services.registry.model import RegistryStore
from services.registry.rollout_model import ExperimentState, RolloutRecord, RolloutState, Verdict

STATES = tuple(dict.fromkeys([*(s.value for s in RolloutState), *(s.value for s in ExperimentState)]))
VERDICT_VALUE = {Verdict.PASS: 1.0, Verdict.INCONCLUSIVE: 0.0, Verdict.FAIL: -1.0}


def rollout_snapshot(store: RegistryStore) -> Callable[[], Awaitable[Snapshot]]:
    async def refresh() -> Snapshot:
        labels = ("tenant", "agent", "endpoint", "kind", "rollout")
        state = Family("corral_rollout_state", "1 for the rollout's current state", (*labels, "state"))
        weight = Family("corral_rollout_weight_percent", "Candidate's share of new sessions",
                        (*labels, "version"))
        verdict = Family("corral_rollout_analysis_verdict",
                         "Last analysis per metric: 1 pass, 0 inconclusive, -1 fail", (*labels, "metric"))
        diff = Family("corral_rollout_analysis_difference", "Candidate minus baseline, last analysis",
                      (*labels, "metric"))
        for r in await store.recent_runs():
            key = (r.tenant, r.agent, r.endpoint.endpoint, r.kind, str(r.id))
            for s in STATES:
                state.samples.append(((*key, s), 1.0 if r.state.value == s else 0.0))
            if not isinstance(r, RolloutRecord):
                weight.samples.append(((*key, ""), 0.0))
                continue
            weight.samples.append(((*key, str(r.candidate_version)), r.current_weight))
            for c in r.last_analysis.comparisons if r.last_analysis else ():
                verdict.samples.append(((*key, c.metric.name), VERDICT_VALUE[c.verdict]))
                diff.samples.append(((*key, c.metric.name), c.difference))
        return [state, weight, verdict, diff]

    return refresh
