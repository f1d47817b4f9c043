-- Request ids (AIP-155): the result of each turn committed under one, written in the same
-- statement as the turn's state, so a retried request finds it instead of running again.
-- Kept CORRAL_REQUEST_RETENTION_S (24 h by default) after the commit; a periodic task deletes
-- older rows, and a session's go with it.
CREATE TABLE IF NOT EXISTS sessions.turn_requests (
    tenant text NOT NULL,
    session_id text NOT NULL,
    request_id text NOT NULL,
    -- sha256 of the request's content type and payload: the same id with another request is
    -- refused rather than answered with this one's result.
    request_digest text NOT NULL,
    -- The session's turn count after the turn.
    turn bigint NOT NULL,
    version text NOT NULL,
    invocation_id text NOT NULL,
    trace_id text NOT NULL,
    content_type text NOT NULL,
    -- At most 8 MiB, as CommitTurn's output.
    output bytea NOT NULL,
    commit_time timestamptz NOT NULL,
    PRIMARY KEY (tenant, session_id, request_id),
    FOREIGN KEY (tenant, session_id) REFERENCES sessions.sessions (tenant, id) ON DELETE CASCADE
);

CREATE INDEX IF NOT EXISTS turn_requests_commit_time ON sessions.turn_requests (commit_time);
