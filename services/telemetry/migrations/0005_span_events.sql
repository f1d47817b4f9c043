-- A span's events (name, time, attributes), above all OpenTelemetry's `exception` event with the
-- agent's traceback, so that `corral spans` can show why an invocation failed.
ALTER TABLE telemetry.spans ADD COLUMN IF NOT EXISTS events jsonb NOT NULL DEFAULT '[]'::jsonb;
