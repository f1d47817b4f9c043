-- Tenancy: every agent, version, endpoint, rollout and experiment belongs to one tenant, and the
-- same agent name in two tenants names two agents. Rows from before tenancy belong to 'default'.
-- Bundles stay content-addressed and shared (a version row, which has a tenant, is the only way
-- to reach one); tools and audit events had their tenant already.

ALTER TABLE registry.agents ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE registry.versions ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE registry.endpoints ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE registry.rollouts ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE registry.stable_history ADD COLUMN tenant text NOT NULL DEFAULT 'default';
ALTER TABLE registry.requests ADD COLUMN tenant text NOT NULL DEFAULT 'default';

-- From now on every writer names the tenant.
ALTER TABLE registry.agents ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE registry.versions ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE registry.endpoints ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE registry.rollouts ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE registry.stable_history ALTER COLUMN tenant DROP DEFAULT;
ALTER TABLE registry.requests ALTER COLUMN tenant DROP DEFAULT;

-- Keys and references by (tenant, name): the foreign keys first, then what they pointed at.
ALTER TABLE registry.rollouts DROP CONSTRAINT rollouts_agent_endpoint_fkey;
ALTER TABLE registry.endpoints DROP CONSTRAINT endpoints_agent_fkey;
ALTER TABLE registry.versions DROP CONSTRAINT versions_agent_fkey;

ALTER TABLE registry.agents DROP CONSTRAINT agents_pkey;
ALTER TABLE registry.agents ADD PRIMARY KEY (tenant, id);

ALTER TABLE registry.versions DROP CONSTRAINT versions_pkey;
ALTER TABLE registry.versions DROP CONSTRAINT versions_agent_digest_key;
ALTER TABLE registry.versions ADD PRIMARY KEY (tenant, agent, number);
ALTER TABLE registry.versions ADD UNIQUE (tenant, agent, digest);
ALTER TABLE registry.versions ADD FOREIGN KEY (tenant, agent) REFERENCES registry.agents (tenant, id);

ALTER TABLE registry.endpoints DROP CONSTRAINT endpoints_pkey;
ALTER TABLE registry.endpoints ADD PRIMARY KEY (tenant, agent, id);
ALTER TABLE registry.endpoints ADD FOREIGN KEY (tenant, agent) REFERENCES registry.agents (tenant, id);

ALTER TABLE registry.rollouts DROP CONSTRAINT rollouts_pkey;
ALTER TABLE registry.rollouts ADD PRIMARY KEY (tenant, agent, endpoint, kind, id);
ALTER TABLE registry.rollouts ADD FOREIGN KEY (tenant, agent, endpoint)
    REFERENCES registry.endpoints (tenant, agent, id);
DROP INDEX registry.rollouts_one_active;
CREATE UNIQUE INDEX rollouts_one_active ON registry.rollouts (tenant, agent, endpoint)
    WHERE state IN ('PROGRESSING', 'PAUSED', 'RUNNING', 'COMPLETE');

ALTER TABLE registry.stable_history DROP CONSTRAINT stable_history_pkey;
ALTER TABLE registry.stable_history ADD PRIMARY KEY (tenant, agent, endpoint, seq);

-- Request ids are the caller's own: two tenants may use the same one.
ALTER TABLE registry.requests DROP CONSTRAINT requests_pkey;
ALTER TABLE registry.requests ADD PRIMARY KEY (tenant, request_id);

-- The audit log is read per tenant, by resource prefix.
DROP INDEX registry.audit_events_resource;
CREATE INDEX audit_events_tenant_resource
    ON registry.audit_events (tenant, resource text_pattern_ops);
