-- Sessions are keyed by (tenant, id): the same session id in two tenants is two sessions.
-- Rows written before tenancy that name no tenant belong to the default one.
UPDATE sessions.sessions SET tenant = 'default' WHERE tenant = '';

ALTER TABLE sessions.session_events ADD COLUMN IF NOT EXISTS tenant text;
UPDATE sessions.session_events e SET tenant = s.tenant
  FROM sessions.sessions s WHERE e.session_id = s.id AND e.tenant IS NULL;
UPDATE sessions.session_events SET tenant = 'default' WHERE tenant IS NULL;
ALTER TABLE sessions.session_events ALTER COLUMN tenant SET NOT NULL;

ALTER TABLE sessions.session_events DROP CONSTRAINT IF EXISTS session_events_session_id_fkey;
ALTER TABLE sessions.session_events DROP CONSTRAINT IF EXISTS session_events_pkey;
ALTER TABLE sessions.sessions DROP CONSTRAINT IF EXISTS sessions_pkey;

ALTER TABLE sessions.sessions ADD PRIMARY KEY (tenant, id);
ALTER TABLE sessions.session_events ADD PRIMARY KEY (tenant, session_id, seq);
ALTER TABLE sessions.session_events ADD CONSTRAINT session_events_session_fkey
    FOREIGN KEY (tenant, session_id) REFERENCES sessions.sessions (tenant, id) ON DELETE CASCADE;

-- RetireVersion finds the live sessions on a version, in one tenant or across all.
CREATE INDEX IF NOT EXISTS sessions_version_active
    ON sessions.sessions (version, tenant) WHERE status = 'ACTIVE';
