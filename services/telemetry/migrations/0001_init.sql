-- Spans as they arrive over OTLP, with the Corral resource names lifted into columns so that the
-- tenant-scoped queries (by version, session, endpoint, time) run on indexes, not on jsonb.
CREATE SCHEMA IF NOT EXISTS telemetry;

CREATE TABLE IF NOT EXISTS telemetry.spans (
    trace_id        text             NOT NULL,  -- 32 lowercase hex digits
    span_id         text             NOT NULL,  -- 16 lowercase hex digits
    parent_span_id  text             NOT NULL DEFAULT '',
    name            text             NOT NULL,
    service         text             NOT NULL DEFAULT '',  -- resource attribute service.name
    kind            text             NOT NULL DEFAULT 'UNSPECIFIED',
    start_time      timestamptz      NOT NULL,
    end_time        timestamptz      NOT NULL,
    duration_ms     double precision NOT NULL,
    status          text             NOT NULL CHECK (status IN ('UNSET', 'OK', 'ERROR')),
    status_message  text             NOT NULL DEFAULT '',
    agent           text             NOT NULL DEFAULT '',
    version         text             NOT NULL DEFAULT '',
    endpoint        text             NOT NULL DEFAULT '',
    session         text             NOT NULL DEFAULT '',
    tenant          text             NOT NULL DEFAULT '',
    invocation_id   text             NOT NULL DEFAULT '',
    is_invocation   boolean          NOT NULL DEFAULT false,
    attributes      jsonb            NOT NULL DEFAULT '{}'::jsonb,
    resource        jsonb            NOT NULL DEFAULT '{}'::jsonb,
    received_at     timestamptz      NOT NULL DEFAULT now(),
    -- A retried export carries the same ids: the primary key makes it a no-op.
    PRIMARY KEY (trace_id, span_id)
);

-- ListSpans without filters, and its keyset paging (newest first).
CREATE INDEX IF NOT EXISTS spans_tenant_time
    ON telemetry.spans (tenant, start_time DESC, trace_id DESC, span_id DESC);
CREATE INDEX IF NOT EXISTS spans_tenant_version_time
    ON telemetry.spans (tenant, version, start_time DESC);
CREATE INDEX IF NOT EXISTS spans_tenant_endpoint_time
    ON telemetry.spans (tenant, endpoint, start_time DESC);
CREATE INDEX IF NOT EXISTS spans_tenant_session_time
    ON telemetry.spans (tenant, session, start_time DESC);
CREATE INDEX IF NOT EXISTS spans_tenant_agent_time
    ON telemetry.spans (tenant, agent, start_time DESC);
CREATE INDEX IF NOT EXISTS spans_tenant_errors_time
    ON telemetry.spans (tenant, start_time DESC) WHERE status = 'ERROR';
-- ListTraces and GetVersionMetrics only read invocation spans, a small share of all spans.
CREATE INDEX IF NOT EXISTS spans_invocations
    ON telemetry.spans (tenant, agent, version, start_time) WHERE is_invocation;
CREATE INDEX IF NOT EXISTS spans_invocations_time
    ON telemetry.spans (tenant, start_time DESC, trace_id DESC) WHERE is_invocation;
