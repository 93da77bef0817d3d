-- The transactional outbox: every change others must hear about is written here in the
-- transaction that makes it, and the relay (relay/) publishes it afterwards.

CREATE TABLE outbox (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    seq             bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    aggregate       text        NOT NULL,
    event_type      text        NOT NULL
                                CHECK (event_type IN ('coupon.created', 'coupon.claimed',
                                                      'coupon.sold_out')),
    payload         jsonb       NOT NULL,
    status          text        NOT NULL DEFAULT 'PENDING'
                                CHECK (status IN ('PENDING', 'SENT', 'FAILED')),
    attempts        integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error      text,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    sent_by         text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    CONSTRAINT outbox_sent_has_time CHECK (status <> 'SENT' OR sent_at IS NOT NULL)
);

CREATE INDEX outbox_pending ON outbox (seq) WHERE status = 'PENDING';
CREATE INDEX outbox_pending_aggregate ON outbox (aggregate, seq) WHERE status = 'PENDING';
CREATE INDEX outbox_failed ON outbox (seq) WHERE status = 'FAILED';
CREATE INDEX outbox_sent_age ON outbox (sent_at) WHERE status = 'SENT';

-- Relays LISTEN on this channel; one notification per inserting statement, delivered at
-- commit (and none for a transaction that rolls back).
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('flashclaim_outbox', '');
    RETURN NULL;
END $$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

COMMENT ON TABLE outbox IS
    'Events for other systems, written in the transaction of the change they announce (so no event for a change that rolled back, and none missing for one that committed), published by the relay and marked SENT after the broker confirms them.';
COMMENT ON COLUMN outbox.id IS 'The event id: event_id in the published event and its AMQP message_id.';
COMMENT ON COLUMN outbox.seq IS
    'Insertion order. Within one coupon it is commit order (its rows are written under the coupon''s row lock), and the relay publishes a coupon''s events in it.';
COMMENT ON COLUMN outbox.aggregate IS 'The coupon the event is about.';
COMMENT ON COLUMN outbox.payload IS 'The fields of the event particular to its type.';
COMMENT ON COLUMN outbox.attempts IS
    'Publishes the broker refused; the row turns FAILED at the bound (FLASHCLAIM_OUTBOX_MAX_ATTEMPTS). A broker that is away costs no attempt.';
COMMENT ON COLUMN outbox.next_attempt_at IS 'A refused row waits until then (backoff).';
COMMENT ON COLUMN outbox.sent_by IS 'The relay instance that published it.';
COMMENT ON INDEX outbox_pending_aggregate IS
    'Whether an earlier event of the same coupon is still pending (the relay''s order rule).';
COMMENT ON INDEX outbox_sent_age IS 'Pruning of SENT rows after the retention period.';
