-- The inbox's deduplication window (consumer/retention.py): PROCESSED rows are deleted
-- once older than INBOX_RETENTION_SECONDS, oldest first, found through this index.
-- On an inbox of millions of rows, building it takes a while and holds writes: apply
-- this migration before a sale, not during one.

CREATE INDEX IF NOT EXISTS inbox_processed_age ON inbox (updated_at)
WHERE status = 'PROCESSED';

COMMENT ON INDEX inbox_processed_age IS
    'Finds PROCESSED rows past the deduplication window (the prune).';
