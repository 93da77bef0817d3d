-- The batched ceiling: the same claim work as pgbench_claim.sql, 100 claims to a
-- transaction, on the one hot coupon row (what a consumer applying batches can reach).
BEGIN;
INSERT INTO inbox (message_id, sender, event_type, payload)
SELECT gen_random_uuid(), 'pgbench', 'coupon.claim.requested', '{}'
FROM generate_series(1, 100);
UPDATE coupons SET remaining_amount = remaining_amount - 100
WHERE name = 'PGBENCH_HOT' AND remaining_amount >= 100;
INSERT INTO claims (coupon_name, user_id, message_id)
SELECT 'PGBENCH_HOT', gen_random_uuid()::text, gen_random_uuid()
FROM generate_series(1, 100);
END;
