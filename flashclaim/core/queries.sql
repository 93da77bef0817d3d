-- Named statements, loaded once by flashclaim.db. Each starts with "-- name: <name>".
-- Parameters always go through the driver.

-- name: create_coupon
-- The coupon and its coupon.created event, in one statement (one transaction);
-- %(traceparent)s: the creating request's trace, or NULL.
WITH created AS (
    INSERT INTO coupons (name, amount, remaining_amount)
    VALUES (%(name)s, %(amount)s, %(amount)s)
    ON CONFLICT (name) DO NOTHING
    RETURNING name, amount, remaining_amount
), announced AS (
    INSERT INTO outbox (aggregate, event_type, payload, traceparent)
    SELECT name, 'coupon.created',
           jsonb_build_object('amount', amount, 'remaining_amount', remaining_amount),
           %(traceparent)s
    FROM created
)
SELECT name, amount, remaining_amount FROM created;

-- name: get_coupon
SELECT c.name, c.amount, c.remaining_amount,
       ARRAY(SELECT cl.user_id FROM claims cl
             WHERE cl.coupon_name = c.name ORDER BY cl.id) AS claimed_by
FROM coupons c
WHERE c.name = %(name)s;

-- name: coupon_remaining
-- An upper bound of the stock from the moment it is read (stock only goes down).
SELECT remaining_amount FROM coupons WHERE name = %(name)s;

-- name: inbox_insert
-- %(rows)s: a JSON array of {message_id, sender, payload} (one document rather than an
-- array per column: orjson writes it far faster than the driver quotes array elements).
-- Message ids are inserted in sorted order so that two consumers holding overlapping
-- batches take the unique-index locks in the same order and cannot deadlock.
INSERT INTO inbox (message_id, sender, event_type, payload, exchange, routing_key,
                   locked_at, locked_by)
SELECT m.message_id, m.sender, %(event_type)s, m.payload, %(exchange)s,
       %(routing_key)s, now(), %(locked_by)s
FROM jsonb_to_recordset(%(rows)s::jsonb) AS m (message_id uuid, sender text, payload jsonb)
ORDER BY m.message_id
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id;

-- name: inbox_lock_existing
-- Rows that already existed: a PENDING one was left by an earlier failed attempt and is
-- applied now, as it was first recorded; a PROCESSED one is a redelivery and only gets
-- its recorded result again.
SELECT message_id, status, outcome, payload
FROM inbox
WHERE message_id = ANY(%(message_ids)s::uuid[])
ORDER BY message_id
FOR UPDATE;

-- name: lock_coupons
-- Pessimistic lock on every coupon the batch touches, in name order (no deadlocks).
-- Stock check, claim inserts and stock deduction all happen under this lock.
SELECT name, amount, remaining_amount
FROM coupons
WHERE name = ANY(%(names)s::text[])
ORDER BY name
FOR UPDATE;

-- name: existing_holders
-- %(rows)s: a JSON array of {coupon_name, user_id}. One probe of claims_one_per_user per
-- pair (the LIMIT keeps the planner from turning it into a scan of claims, which it
-- does when the statistics of a fast-growing table are behind).
SELECT r.coupon_name, r.user_id
FROM jsonb_to_recordset(%(rows)s::jsonb) AS r (coupon_name text, user_id text)
CROSS JOIN LATERAL (
    SELECT 1 FROM claims cl
    WHERE cl.user_id = r.user_id AND cl.coupon_name = r.coupon_name
    LIMIT 1
) AS held;

-- name: insert_claims
-- %(rows)s: a JSON array of {coupon_name, user_id, message_id}, in decision order.
INSERT INTO claims (coupon_name, user_id, message_id)
SELECT g.doc ->> 'coupon_name', g.doc ->> 'user_id', (g.doc ->> 'message_id')::uuid
FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS g (doc, ord)
ORDER BY g.ord;

-- name: deduct_stock
UPDATE coupons c
SET remaining_amount = c.remaining_amount - d.taken
FROM unnest(%(names)s::text[], %(taken)s::int[]) AS d (name, taken)
WHERE c.name = d.name;

-- name: record_results
-- %(rows)s: a JSON array of {message_id, outcome}; %(ids)s: the same message ids,
-- so that the rows are found through the primary key whatever the statistics say (a
-- join on the JSON alone scans the inbox when they are behind its growth).
UPDATE inbox i
SET status = 'PROCESSED', outcome = r.outcome,
    error = NULL, locked_at = NULL, locked_by = NULL, updated_at = now()
FROM jsonb_to_recordset(%(rows)s::jsonb) AS r (message_id uuid, outcome text)
WHERE i.message_id = r.message_id AND i.message_id = ANY(%(ids)s::uuid[]);

-- name: outbox_insert
-- %(rows)s: a JSON array of {aggregate, event_type, payload, traceparent}, in the order
-- they happened (seq is drawn in that order). Written in the batch's transaction, after
-- its coupons were locked: a coupon's events are in commit order.
INSERT INTO outbox (aggregate, event_type, payload, traceparent)
SELECT e.doc ->> 'aggregate', e.doc ->> 'event_type', e.doc -> 'payload',
       e.doc ->> 'traceparent'
FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS e (doc, ord)
ORDER BY e.ord;

-- name: inbox_result
SELECT status, outcome, payload ->> 'user_id' AS user_id,
       payload ->> 'coupon_name' AS coupon_name
FROM inbox
WHERE message_id = %(message_id)s;

-- name: inbox_prune
-- PROCESSED commands past the deduplication window, a bounded number at a time, each
-- call its own short transaction (consumer/retention.py). FAILED rows (their commands
-- wait in the dead-letter queue) and PENDING ones stay. SKIP LOCKED: a row a batch
-- holds, or another consumer's prune, is left for the next call.
DELETE FROM inbox
WHERE message_id IN (SELECT message_id FROM inbox
                     WHERE status = 'PROCESSED'
                       AND updated_at < now() - make_interval(secs => %(retention)s::float8)
                     ORDER BY updated_at
                     LIMIT %(limit)s
                     FOR UPDATE SKIP LOCKED);

-- name: inbox_record_failure
-- A failed attempt, counted here rather than by the broker (whose x-delivery-count
-- stops counting requeues in RabbitMQ 4.3), in its own transaction (the batch's was
-- rolled back). The row turns FAILED at the max_attempts-th failure. A FAILED row that
-- fails again was replayed by an operator: its count starts over. Rows already
-- PROCESSED are left alone (no row returned): their effect and answer stand.
INSERT INTO inbox (message_id, sender, event_type, payload, exchange, routing_key,
                   status, retry_count, error)
VALUES (%(message_id)s, %(sender)s, %(event_type)s, %(payload)s::jsonb, %(exchange)s,
        %(routing_key)s,
        CASE WHEN %(max_attempts)s::int <= 1 THEN 'FAILED' ELSE 'PENDING' END, 1, %(error)s)
ON CONFLICT (message_id) DO UPDATE
SET retry_count = CASE WHEN inbox.status = 'FAILED' THEN 1 ELSE inbox.retry_count + 1 END,
    status = CASE WHEN (CASE WHEN inbox.status = 'FAILED' THEN 1
                             ELSE inbox.retry_count + 1 END) >= %(max_attempts)s::int
                  THEN 'FAILED' ELSE 'PENDING' END,
    error = EXCLUDED.error, locked_at = NULL, locked_by = NULL, updated_at = now()
WHERE inbox.status <> 'PROCESSED'
RETURNING retry_count, status;

-- name: audit_stock
-- Every audit query takes %(coupons)s: NULL for the whole database, or the coupon
-- names one sale is about (`flashclaim audit --coupon`).
SELECT c.name, c.amount, c.remaining_amount, count(cl.id) AS claimed
FROM coupons c
LEFT JOIN claims cl ON cl.coupon_name = c.name
WHERE %(coupons)s::text[] IS NULL OR c.name = ANY(%(coupons)s::text[])
GROUP BY c.name
HAVING c.remaining_amount <> c.amount - count(cl.id)
ORDER BY c.name
LIMIT 100;

-- name: audit_guarantees
-- What the database itself guarantees (a user holds a coupon at most once; stock
-- within 0..amount; a PROCESSED command has its answer) holds only while the
-- constraints are there and validated. Counting duplicate holders or negative stock
-- would find nothing while they are; their absence is the finding.
SELECT expected.tbl AS "table", expected.name AS missing_constraint
FROM (VALUES ('claims', 'claims_one_per_user'),
             ('coupons', 'coupons_remaining_in_range'),
             ('inbox', 'inbox_processed_has_result')) AS expected (tbl, name)
WHERE NOT EXISTS (
    SELECT 1 FROM pg_constraint c
    WHERE c.conname = expected.name AND c.conrelid = expected.tbl::regclass AND c.convalidated
);

-- name: audit_claims_without_success
-- Every claim row must come from a command whose recorded outcome was 'claimed'. Past
-- the inbox's deduplication window (%(inbox_retention)s) its command row may be gone
-- (pruned; the claim is made in the transaction that processes it, so their times are
-- the same), or made again by a retry that came after the window, which found the
-- claim and was refused as a second one (consumer/retention.py).
SELECT cl.message_id, cl.coupon_name, i.status, i.outcome
FROM claims cl
LEFT JOIN inbox i ON i.message_id = cl.message_id
WHERE (CASE WHEN i.message_id IS NULL
            THEN cl.claimed_at >= now() - make_interval(secs => %(inbox_retention)s::float8)
            ELSE i.status <> 'PROCESSED'
                 OR (i.outcome <> 'claimed'
                     AND NOT (i.outcome = 'already_claimed' AND i.created_at
                              >= cl.claimed_at + make_interval(secs => %(inbox_retention)s::float8)))
       END)
  AND (%(coupons)s::text[] IS NULL OR cl.coupon_name = ANY(%(coupons)s::text[]))
LIMIT 100;

-- name: audit_success_without_claim
-- Every 'claimed' outcome must have its claim row.
SELECT i.message_id, i.payload ->> 'coupon_name' AS coupon_name
FROM inbox i
LEFT JOIN claims cl ON cl.message_id = i.message_id
WHERE i.status = 'PROCESSED' AND i.outcome = 'claimed' AND cl.id IS NULL
  AND (%(coupons)s::text[] IS NULL OR i.payload ->> 'coupon_name' = ANY(%(coupons)s::text[]))
LIMIT 100;

-- name: audit_stale_pending
SELECT message_id, created_at, retry_count, error
FROM inbox
WHERE status = 'PENDING' AND created_at < now() - make_interval(secs => %(older_than)s)
  AND (%(coupons)s::text[] IS NULL OR payload ->> 'coupon_name' = ANY(%(coupons)s::text[]))
ORDER BY created_at
LIMIT 100;

-- name: audit_totals
SELECT (SELECT count(*) FROM coupons
        WHERE %(coupons)s::text[] IS NULL OR name = ANY(%(coupons)s::text[])) AS coupons,
       (SELECT count(*) FROM claims
        WHERE %(coupons)s::text[] IS NULL OR coupon_name = ANY(%(coupons)s::text[])) AS claims,
       (SELECT count(*) FROM inbox
        WHERE %(coupons)s::text[] IS NULL
           OR payload ->> 'coupon_name' = ANY(%(coupons)s::text[])) AS inbox,
       (SELECT count(*) FROM inbox WHERE status = 'FAILED'
          AND (%(coupons)s::text[] IS NULL
               OR payload ->> 'coupon_name' = ANY(%(coupons)s::text[]))) AS failed;

-- name: outbox_take
-- The relay's batch: the oldest pending rows that are due, locked until its transaction
-- ends (other relays skip them). A row is ready only if every pending row of its coupon
-- before it is in the batch too: an earlier one held by another relay, or waiting out a
-- backoff, holds back the rest of its coupon (a coupon's events go out in seq order,
-- which is its commit order). Rows not ready stay locked and untouched.
WITH taken AS MATERIALIZED (
    SELECT id, seq, aggregate, event_type, payload, created_at, traceparent
    FROM outbox
    WHERE status = 'PENDING' AND next_attempt_at <= now()
    ORDER BY seq
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), span AS MATERIALIZED (
    SELECT aggregate, max(seq) AS last FROM taken GROUP BY aggregate
), gap AS MATERIALIZED (
    -- Per coupon, the first pending row up to the batch's last that the batch lacks: a
    -- walk of outbox_pending_aggregate from the coupon's oldest pending row, about as
    -- long as the batch (a join would read the whole table at every step).
    SELECT s.aggregate,
           (SELECT min(o.seq) FROM outbox o
            WHERE o.aggregate = s.aggregate AND o.status = 'PENDING' AND o.seq <= s.last
              AND o.seq NOT IN (SELECT seq FROM taken)) AS seq
    FROM span s
)
SELECT t.id, t.seq, t.aggregate, t.event_type, t.payload, t.created_at, t.traceparent,
       g.seq IS NULL OR t.seq < g.seq AS ready
FROM taken t
LEFT JOIN gap g ON g.aggregate = t.aggregate
ORDER BY t.seq;

-- name: outbox_mark_sent
UPDATE outbox
SET status = 'SENT', sent_at = now(), sent_by = %(relay)s, last_error = NULL
WHERE id = ANY(%(ids)s::uuid[]);

-- name: outbox_mark_refused
-- Publishes the broker refused (nacked): counted, retried after a backoff that doubles
-- from %(backoff)s up to %(backoff_max)s seconds, FAILED at the %(max_attempts)s-th.
UPDATE outbox
SET attempts = attempts + 1,
    last_error = %(error)s,
    status = CASE WHEN attempts + 1 >= %(max_attempts)s THEN 'FAILED' ELSE 'PENDING' END,
    next_attempt_at = now() + make_interval(
        secs => least(%(backoff_max)s::float8, %(backoff)s::float8 * 2 ^ attempts))
WHERE id = ANY(%(ids)s::uuid[])
RETURNING id, status, attempts;

-- name: outbox_prune
-- SENT rows past the retention period, a bounded number at a time.
DELETE FROM outbox
WHERE id IN (SELECT id FROM outbox
             WHERE status = 'SENT'
               AND sent_at < now() - make_interval(secs => %(retention)s::float8)
             LIMIT %(limit)s);

-- name: outbox_stats
SELECT (SELECT count(*) FROM outbox WHERE status = 'PENDING') AS pending,
       (SELECT count(*) FROM outbox WHERE status = 'FAILED') AS failed,
       (SELECT extract(epoch FROM now() - min(created_at))::float8
        FROM outbox WHERE status = 'PENDING') AS oldest_pending_seconds,
       (SELECT max(sent_at) FROM outbox WHERE status = 'SENT') AS last_sent_at;

-- name: outbox_failed
SELECT id, seq, aggregate, event_type, attempts, last_error, created_at
FROM outbox
WHERE status = 'FAILED'
ORDER BY seq
LIMIT %(limit)s;

-- name: outbox_retry
-- FAILED rows (all, or those of %(ids)s) made due again, their count started over; the
-- relays are woken (%(channel)s: flashclaim.core.events.NOTIFY_CHANNEL).
WITH retried AS (
    UPDATE outbox
    SET status = 'PENDING', attempts = 0, next_attempt_at = now()
    WHERE status = 'FAILED' AND (%(ids)s::uuid[] IS NULL OR id = ANY(%(ids)s::uuid[]))
    RETURNING id
)
SELECT id, pg_notify(%(channel)s, '') IS NULL AS notified FROM retried;

-- name: audit_claims_without_event
-- Every claim made within the outbox's retention period has exactly one coupon.claimed
-- event (older SENT events may have been pruned).
SELECT cl.message_id, cl.coupon_name, count(o.id) AS events
FROM claims cl
LEFT JOIN outbox o ON o.event_type = 'coupon.claimed'
                  AND o.aggregate = cl.coupon_name
                  AND o.payload ->> 'request_id' = cl.message_id::text
WHERE cl.claimed_at > now() - make_interval(secs => %(retention)s::float8)
  AND (%(coupons)s::text[] IS NULL OR cl.coupon_name = ANY(%(coupons)s::text[]))
GROUP BY cl.message_id, cl.coupon_name
HAVING count(o.id) <> 1
LIMIT 100;

-- name: audit_coupons_without_events
-- Every coupon created within the retention period has one coupon.created event, and
-- one coupon.sold_out if (and only if) it is sold out.
SELECT c.name,
       count(*) FILTER (WHERE o.event_type = 'coupon.created') AS created,
       count(*) FILTER (WHERE o.event_type = 'coupon.sold_out') AS sold_out,
       c.remaining_amount
FROM coupons c
LEFT JOIN outbox o ON o.aggregate = c.name AND o.event_type <> 'coupon.claimed'
WHERE c.created_at > now() - make_interval(secs => %(retention)s::float8)
  AND (%(coupons)s::text[] IS NULL OR c.name = ANY(%(coupons)s::text[]))
GROUP BY c.name, c.remaining_amount
HAVING count(*) FILTER (WHERE o.event_type = 'coupon.created') <> 1
    OR count(*) FILTER (WHERE o.event_type = 'coupon.sold_out')
       <> (CASE WHEN c.remaining_amount = 0 THEN 1 ELSE 0 END)
LIMIT 100;

-- name: story_inbox
-- `flashclaim claim show`: the command's inbox row.
SELECT status, retry_count, error, outcome, sender, payload,
       created_at, updated_at
FROM inbox
WHERE message_id = %(request_id)s;

-- name: story_claim
SELECT id, coupon_name, user_id, claimed_at FROM claims WHERE message_id = %(request_id)s;

-- name: story_event
-- The claim's coupon.claimed event (a scan of the outbox: an operator's query).
SELECT id, seq, status, attempts, last_error, created_at, sent_at, sent_by, traceparent
FROM outbox
WHERE event_type = 'coupon.claimed' AND payload ->> 'request_id' = %(request_id)s::text;

-- name: inbox_failed_count
-- Dead-lettered commands waiting for an operator (a consumer's gauge, read every few
-- seconds: a walk of the partial index inbox_failed).
SELECT count(*) FROM inbox WHERE status = 'FAILED';

-- name: sale_coupon
-- The console's live view of a sale: one coupon's stock (the claims granted a second
-- are the fall of remaining_amount between two reads: console.py).
SELECT name, amount, remaining_amount, created_at FROM coupons WHERE name = %(name)s;

-- name: sale_recent_coupons
-- The coupons created last, to pick one to watch (a scan of coupons: an operator's page).
SELECT name, amount, remaining_amount, created_at
FROM coupons
ORDER BY created_at DESC
LIMIT %(limit)s;
