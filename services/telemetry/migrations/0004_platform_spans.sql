-- Which spans the platform exported (a Corral service proving itself with its certificate) and
-- which a tenant's principal did: only the platform's count in metrics and rollout analysis.
-- Spans stored before this change were accepted from anyone; they are kept as the platform's (the
-- default, also for replicas not yet upgraded) so that existing metrics do not change.
ALTER TABLE telemetry.spans ADD COLUMN IF NOT EXISTS platform boolean NOT NULL DEFAULT true;
