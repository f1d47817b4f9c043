-- Spans and scores are keyed by tenant: the same trace or session id in two tenants is two
-- things, and a span exported under one tenant never collides with (or hides) another's.
-- Rows written before tenancy that name no tenant belong to the default one.
UPDATE telemetry.spans SET tenant = 'default' WHERE tenant = '';
UPDATE telemetry.scores SET tenant = 'default' WHERE tenant = '';

ALTER TABLE telemetry.spans DROP CONSTRAINT IF EXISTS spans_pkey;
ALTER TABLE telemetry.spans ADD PRIMARY KEY (tenant, trace_id, span_id);

-- Rollout analysis reads one version's scores within a tenant (spans have
-- spans_tenant_version_time already).
CREATE INDEX IF NOT EXISTS scores_tenant_version_time
    ON telemetry.scores (tenant, version, name, create_time);
