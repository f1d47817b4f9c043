-- What agents printed and logged (OTLP log records), per tenant, in arrival order (`id`), and how
-- much of each invocation's output is stored: an invocation keeps a bounded amount, over all of
-- its exports, and one note when it went over.
CREATE TABLE IF NOT EXISTS telemetry.logs (
    tenant          text        NOT NULL,
    id              bigserial   NOT NULL,
    time            timestamptz NOT NULL,
    agent           text        NOT NULL DEFAULT '',
    version         text        NOT NULL DEFAULT '',
    session         text        NOT NULL DEFAULT '',
    invocation_id   text        NOT NULL DEFAULT '',
    trace_id        text        NOT NULL DEFAULT '',
    span_id         text        NOT NULL DEFAULT '',
    severity_number integer     NOT NULL DEFAULT 0,
    severity_text   text        NOT NULL DEFAULT '',
    source          text        NOT NULL DEFAULT '',
    body            text        NOT NULL DEFAULT '',
    platform        boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (tenant, id)
);
CREATE INDEX IF NOT EXISTS logs_tenant_agent_id ON telemetry.logs (tenant, agent, id);
CREATE INDEX IF NOT EXISTS logs_tenant_invocation ON telemetry.logs (tenant, invocation_id, id);

-- Per (tenant, invocation or, for records naming none, trace): the bytes of bodies stored.
CREATE TABLE IF NOT EXISTS telemetry.log_budgets (
    tenant     text    NOT NULL,
    scope      text    NOT NULL,
    used_bytes bigint  NOT NULL DEFAULT 0,
    truncated  boolean NOT NULL DEFAULT false,
    PRIMARY KEY (tenant, scope)
);
