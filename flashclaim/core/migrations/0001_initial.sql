-- The schema as first released: coupons, claims and the inbox.
-- Written to be harmless on a database built by the schema.sql of those releases.

CREATE TABLE IF NOT EXISTS coupons (
    name             text        PRIMARY KEY
                                 CHECK (char_length(name) BETWEEN 1 AND 128),
    amount           integer     NOT NULL CHECK (amount >= 1),
    remaining_amount integer     NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- Stock can never go negative nor above the amount issued, whatever the code does.
    CONSTRAINT coupons_remaining_in_range
        CHECK (remaining_amount >= 0 AND remaining_amount <= amount)
);

-- Claim history lives apart from the coupon row. The database, not the code,
-- guarantees that a user holds a given coupon at most once.
CREATE TABLE IF NOT EXISTS claims (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    coupon_name text        NOT NULL REFERENCES coupons (name),
    user_id     text        NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 128),
    message_id  uuid        NOT NULL UNIQUE,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT claims_one_per_user UNIQUE (user_id, coupon_name)
);

-- claimed_by is listed in claim order.
CREATE INDEX IF NOT EXISTS claims_coupon_order ON claims (coupon_name, id);

-- Every command a consumer accepts is recorded here first, keyed by its message id.
-- A redelivered or replayed message finds its row and gets the recorded result back
-- instead of having a second effect.
CREATE TABLE IF NOT EXISTS inbox (
    message_id    uuid        PRIMARY KEY,
    sender        text        NOT NULL,
    event_type    text        NOT NULL,
    payload       jsonb       NOT NULL,
    status        text        NOT NULL DEFAULT 'PENDING'
                              CHECK (status IN ('PENDING', 'PROCESSED', 'FAILED')),
    retry_count   integer     NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    exchange      text        NOT NULL DEFAULT '',
    routing_key   text        NOT NULL DEFAULT '',
    error         text,
    locked_at     timestamptz,
    locked_by     text,
    -- The answer the command produced, as the HTTP client is to see it.
    result_status smallint,
    result_body   jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT inbox_processed_has_result
        CHECK (status <> 'PROCESSED' OR (result_status IS NOT NULL AND result_body IS NOT NULL))
);

CREATE INDEX IF NOT EXISTS inbox_pending_age ON inbox (created_at) WHERE status = 'PENDING';
