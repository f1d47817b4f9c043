-- What exporters (executors) told telemetry of the spans it does not have: the start time of the
-- oldest span each still holds undelivered (its latest report replaces the previous), and the
-- spans each had to drop. The analyses answer INCONCLUSIVE over a window such spans fall in.
-- Not per tenant: an executor's buffer holds every tenant's spans.
CREATE TABLE IF NOT EXISTS telemetry.exporter_delivery (
    exporter          text        PRIMARY KEY,
    undelivered_since timestamptz,
    report_time       timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS telemetry.dropped_spans (
    id          bigserial   PRIMARY KEY,
    exporter    text        NOT NULL,
    start_time  timestamptz NOT NULL,
    end_time    timestamptz NOT NULL,
    count       bigint      NOT NULL,
    report_time timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS dropped_spans_by_time ON telemetry.dropped_spans (end_time, start_time);
