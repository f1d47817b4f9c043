CREATE SCHEMA IF NOT EXISTS sessions;

-- Every change to a session row takes the next value, so the Redis cache can refuse to replace a
-- newer copy of a record with an older one read concurrently.
CREATE SEQUENCE IF NOT EXISTS sessions.revision_seq;

CREATE TABLE IF NOT EXISTS sessions.sessions (
    id text PRIMARY KEY,
    agent text NOT NULL,
    -- The version pin: set at creation, never updated.
    version text NOT NULL,
    version_digest text NOT NULL,
    endpoint text NOT NULL DEFAULT '',
    tenant text NOT NULL,
    user_id text NOT NULL,
    status text NOT NULL CHECK (status IN ('ACTIVE', 'STOPPED', 'EXPIRED')),
    turn_count bigint NOT NULL DEFAULT 0,
    state bytea NOT NULL DEFAULT ''::bytea,
    state_etag text NOT NULL,
    create_time timestamptz NOT NULL,
    update_time timestamptz NOT NULL,
    last_active_time timestamptz NOT NULL,
    idle_timeout_s integer NOT NULL CHECK (idle_timeout_s > 0),
    max_lifetime_s integer NOT NULL CHECK (max_lifetime_s > 0),
    revision bigint NOT NULL DEFAULT nextval('sessions.revision_seq')
);

-- ListSessions: one tenant, keyset order (create_time, id).
CREATE INDEX IF NOT EXISTS sessions_tenant_order ON sessions.sessions (tenant, create_time, id);
-- Expiry sweeps look only at live sessions.
CREATE INDEX IF NOT EXISTS sessions_tenant_active ON sessions.sessions (tenant) WHERE status = 'ACTIVE';

-- The turns of each session, in order: seq is the session's turn_count after that turn.
CREATE TABLE IF NOT EXISTS sessions.session_events (
    session_id text NOT NULL REFERENCES sessions.sessions (id) ON DELETE CASCADE,
    seq bigint NOT NULL,
    invocation_id text NOT NULL,
    input bytea NOT NULL,
    output bytea NOT NULL,
    create_time timestamptz NOT NULL,
    PRIMARY KEY (session_id, seq)
);
