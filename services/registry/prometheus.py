"""Rollout state, weight and analysis verdicts as Prometheus metrics, beside telemetry's
per-version metrics, so one dashboard shows a rollout and the numbers it decides on."""

from __future__ import annotations

from services.common.prometheus import Family, Snapshot
from services.registry.rollout_store import RolloutStore
from services.registry.store import RegistryStore

STATES = ("PROGRESSING", "PAUSED", "SUCCEEDED", "ROLLED_BACK", "ABORTED", "RUNNING", "COMPLETE", "CONCLUDED")
VERDICT_VALUE = {"PASS": 1.0, "INCONCLUSIVE": 0.0, "FAIL": -1.0}


def rollout_snapshot(store: RegistryStore, rollouts: RolloutStore):  # type: ignore[no-untyped-def]
    async def refresh() -> Snapshot:
        labels = ("agent", "endpoint", "kind", "id")
        state = Family("corral_rollout_state", "1 for the rollout's current state", (*labels, "state"))
        weight = Family("corral_rollout_weight_percent", "Candidate's share of new sessions", labels)
        verdict = Family("corral_rollout_analysis_verdict",
                         "Last analysis per metric: 1 pass, 0 inconclusive, -1 fail", (*labels, "metric"))
        diff = Family("corral_rollout_analysis_difference", "Candidate minus baseline, last analysis",
                      (*labels, "metric"))
        for r in await rollouts.recent(store.pool):
            key = (r.agent, r.endpoint, r.kind, str(r.id))
            for s in STATES:
                state.samples.append(((*key, s), 1.0 if r.state == s else 0.0))
            weight.samples.append((key, r.current_weight))
            for c in (r.last_analysis or {}).get("comparisons", []):
                name = c.get("metric", {}).get("name", "")
                verdict.samples.append(((*key, name), VERDICT_VALUE.get(c.get("verdict", ""), 0.0)))
                diff.samples.append(((*key, name), float(c.get("difference", 0.0))))
        return [state, weight, verdict, diff]

    return refresh
