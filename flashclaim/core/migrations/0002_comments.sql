-- What each table and its less obvious columns are for, kept in the catalog itself:
-- psql's \d+ shows it, and so does schema.sql, which is the migrated catalog's dump.

COMMENT ON TABLE coupons IS
    'A coupon on sale: amount issued and stock left. Stock can never go negative nor above the amount issued (coupons_remaining_in_range), whatever the code does.';
COMMENT ON TABLE claims IS
    'Claim history, apart from the coupon row. The database, not the code, guarantees that a user holds a given coupon at most once (claims_one_per_user).';
COMMENT ON INDEX claims_coupon_order IS 'claimed_by is listed in claim order.';
COMMENT ON TABLE inbox IS
    'Every command a consumer accepts is recorded here first, keyed by its message id. A redelivered or replayed message finds its row and gets the recorded result back instead of having a second effect.';
COMMENT ON COLUMN inbox.retry_count IS
    'Failed attempts, counted by the consumer (not the broker); the row turns FAILED at the bound.';
COMMENT ON COLUMN inbox.result_status IS 'The HTTP status of the answer the command produced.';
COMMENT ON COLUMN inbox.result_body IS 'The JSON body of that answer, as the HTTP client is to see it.';
COMMENT ON INDEX inbox_pending_age IS 'Finds PENDING rows by age (the audit of stale commands).';
