-- Where a rollback of each endpoint goes, kept beside its traffic so watchers (the executors'
-- warm pools) learn it with every endpoint change.
ALTER TABLE registry.endpoints ADD COLUMN IF NOT EXISTS rollback_version bigint;
