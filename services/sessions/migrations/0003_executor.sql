-- The executor a session's turns go to (`executors/{name}`; empty: never placed). The router
-- records it at creation and moves it (PlaceSession, a compare-and-set) when that executor left
-- the fleet or was drained.
ALTER TABLE sessions.sessions ADD COLUMN IF NOT EXISTS executor text NOT NULL DEFAULT '';
