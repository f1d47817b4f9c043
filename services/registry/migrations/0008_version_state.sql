-- The start check at publish: a version is CHECKING until an executor has started it once, then
-- READY, or FAILED with what it raised (failure: {error_type, message, traceback}). Versions from
-- before the check were never started by it and have served as they are: READY.
ALTER TABLE registry.versions ADD COLUMN state text NOT NULL DEFAULT 'READY'
    CHECK (state IN ('CHECKING', 'READY', 'FAILED'));
ALTER TABLE registry.versions ADD COLUMN failure jsonb;
ALTER TABLE registry.versions ALTER COLUMN state DROP DEFAULT;
