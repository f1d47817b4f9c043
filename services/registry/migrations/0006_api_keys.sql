-- API keys, per tenant (0005 is the tenancy change; this one depends on nothing after 0004). Only
-- a SHA-256 hash of each key's secret is kept; the id is the public part of the key
-- (crl_<id>_<secret>). A display name is unique among the tenant's keys that are not revoked.
CREATE TABLE IF NOT EXISTS registry.api_keys (
    id text PRIMARY KEY,
    tenant text NOT NULL,
    display_name text NOT NULL,
    role text NOT NULL CHECK (role IN ('viewer', 'invoker', 'operator', 'admin')),
    platform_admin boolean NOT NULL DEFAULT false,
    secret_hash bytea NOT NULL CHECK (length(secret_hash) = 32),
    creator text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    expire_time timestamptz NULL,
    last_use_time timestamptz NULL,
    revoke_time timestamptz NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_live_name
    ON registry.api_keys (tenant, display_name) WHERE revoke_time IS NULL;
CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON registry.api_keys (tenant, create_time, id);
