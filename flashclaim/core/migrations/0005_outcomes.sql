-- The inbox keeps what a command decided, its outcome, not the HTTP answer made of it:
-- the gateway alone maps outcomes to HTTP. The outcome's user and coupon are the
-- command's own (payload). result_status and result_body stay for the rows answered
-- before, and are no longer written.

ALTER TABLE inbox ADD COLUMN IF NOT EXISTS outcome text;

-- Rows answered before: their outcome from the answer they kept.
UPDATE inbox
SET outcome = CASE WHEN result_status = 200 THEN 'claimed' ELSE result_body ->> 'code' END
WHERE status = 'PROCESSED' AND outcome IS NULL;

-- While this release rolls out, a consumer of the one before may still record an answer:
-- its outcome is derived as it is written.
CREATE OR REPLACE FUNCTION inbox_outcome_of_answer() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.outcome IS NULL AND NEW.result_status IS NOT NULL THEN
        NEW.outcome := CASE WHEN NEW.result_status = 200 THEN 'claimed'
                            ELSE NEW.result_body ->> 'code' END;
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS inbox_outcome_of_answer ON inbox;
CREATE TRIGGER inbox_outcome_of_answer BEFORE UPDATE OF result_status ON inbox
FOR EACH ROW EXECUTE FUNCTION inbox_outcome_of_answer();

ALTER TABLE inbox DROP CONSTRAINT IF EXISTS inbox_processed_has_result;
ALTER TABLE inbox ADD CONSTRAINT inbox_processed_has_result
    CHECK (status <> 'PROCESSED' OR outcome IS NOT NULL);
ALTER TABLE inbox ADD CONSTRAINT inbox_outcome_known
    CHECK (outcome IN ('claimed', 'already_claimed', 'out_of_stock', 'coupon_not_found'));

COMMENT ON COLUMN inbox.outcome IS
    'What the command decided: claimed, already_claimed, out_of_stock or coupon_not_found.';
COMMENT ON COLUMN inbox.result_status IS
    'Rows answered before the outcome column: the HTTP status of the answer (not written now).';
COMMENT ON COLUMN inbox.result_body IS
    'Rows answered before the outcome column: the JSON body of the answer (not written now).';
