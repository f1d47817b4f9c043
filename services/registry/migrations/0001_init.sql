CREATE SCHEMA IF NOT EXISTS registry;

CREATE TABLE IF NOT EXISTS registry.agents (
    id text PRIMARY KEY,
    create_time timestamptz NOT NULL DEFAULT now(),
    creator text NOT NULL DEFAULT ''
);

-- Bundle blobs, content-addressed: two versions with the same bytes share one row.
CREATE TABLE IF NOT EXISTS registry.bundles (
    digest text PRIMARY KEY,
    size bigint NOT NULL,
    data bytea NOT NULL
);

CREATE TABLE IF NOT EXISTS registry.versions (
    agent text NOT NULL REFERENCES registry.agents (id),
    number bigint NOT NULL,
    digest text NOT NULL REFERENCES registry.bundles (digest),
    size bigint NOT NULL,
    manifest jsonb NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    creator text NOT NULL DEFAULT '',
    PRIMARY KEY (agent, number),
    UNIQUE (agent, digest)
);

CREATE TABLE IF NOT EXISTS registry.endpoints (
    agent text NOT NULL REFERENCES registry.agents (id),
    id text NOT NULL,
    -- [[version, basis_points], ...] ordered by version
    traffic jsonb NOT NULL,
    follow_latest boolean NOT NULL DEFAULT false,
    salt text NOT NULL,
    revision bigint NOT NULL DEFAULT 1,
    description text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent, id)
);

CREATE TABLE IF NOT EXISTS registry.audit_events (
    id bigserial PRIMARY KEY,
    time timestamptz NOT NULL DEFAULT now(),
    tenant text NOT NULL,
    "user" text NOT NULL,
    method text NOT NULL,
    resource text NOT NULL,
    details jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS audit_events_resource ON registry.audit_events (resource text_pattern_ops);

-- Publishing is idempotent per request_id, as well as per digest.
CREATE TABLE IF NOT EXISTS registry.requests (
    request_id text PRIMARY KEY,
    resource text NOT NULL,
    time timestamptz NOT NULL DEFAULT now()
);
