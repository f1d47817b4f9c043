-- Quality scores on a session (and optionally one of its traces): reviewers, judges, code checks,
-- user feedback. The version is the session's, taken from its spans when the score is recorded.
CREATE TABLE IF NOT EXISTS telemetry.scores (
    id          bigserial PRIMARY KEY,
    session     text             NOT NULL,
    trace_id    text             NOT NULL DEFAULT '',
    name        text             NOT NULL,
    value       double precision NOT NULL,
    source      text             NOT NULL DEFAULT 'HUMAN',
    comment     text             NOT NULL DEFAULT '',
    agent       text             NOT NULL DEFAULT '',
    version     text             NOT NULL DEFAULT '',
    endpoint    text             NOT NULL DEFAULT '',
    tenant      text             NOT NULL,
    user_id     text             NOT NULL DEFAULT '',
    create_time timestamptz      NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS scores_version_time ON telemetry.scores (version, name, create_time);
CREATE INDEX IF NOT EXISTS scores_tenant_session ON telemetry.scores (tenant, session, create_time DESC);
-- The rollout analysis groups a version's spans by session within a window.
CREATE INDEX IF NOT EXISTS spans_version_time ON telemetry.spans (version, start_time);
