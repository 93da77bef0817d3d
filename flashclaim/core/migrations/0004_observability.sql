-- transactional: false
-- Observability. FAILED inbox rows are counted every few seconds by each consumer (the
-- flashclaim_inbox_failed gauge): a partial index makes that a walk of those rows alone,
-- built without blocking the consumers' writes (hence no transaction). An outbox row
-- keeps the trace of the change it announces, so that its publish joins that trace.

CREATE INDEX CONCURRENTLY IF NOT EXISTS inbox_failed ON inbox (created_at)
WHERE status = 'FAILED';

COMMENT ON INDEX inbox_failed IS 'Counts FAILED rows (dead-lettered, waiting for a replay).';

ALTER TABLE outbox ADD COLUMN IF NOT EXISTS traceparent text;

COMMENT ON COLUMN outbox.traceparent IS
    'W3C traceparent of the trace the change belongs to (a claim''s); NULL when it was not traced.';
