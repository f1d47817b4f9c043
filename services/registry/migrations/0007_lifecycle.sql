-- Deleting agents, versions and endpoints, and the retention of unused versions.
--
-- A version number is never given twice, even after its version (or its whole agent) was
-- deleted: routers, executors and sessions cache a version's digest by its name for good. The
-- highest number an agent ever had is kept here when its versions are deleted.
CREATE TABLE IF NOT EXISTS registry.version_numbers (
    tenant text NOT NULL,
    agent text NOT NULL,
    highest bigint NOT NULL,
    PRIMARY KEY (tenant, agent)
);

-- When an endpoint last stopped routing to the version (NULL: never routed): retention counts
-- a version as used until then.
ALTER TABLE registry.versions ADD COLUMN IF NOT EXISTS last_routed_time timestamptz;

-- Bundles are collected when no version of any tenant has their digest.
CREATE INDEX IF NOT EXISTS versions_digest ON registry.versions (digest);
