-- The one-transaction-per-claim ceiling: what a design that spends one database
-- transaction per claim can reach on one hot coupon row (inbox insert, conditional
-- stock decrement, claim insert), measured with pgbench.
BEGIN;
INSERT INTO inbox (message_id, sender, event_type, payload)
VALUES (gen_random_uuid(), 'pgbench', 'coupon.claim.requested', '{}');
UPDATE coupons SET remaining_amount = remaining_amount - 1
WHERE name = 'PGBENCH_HOT' AND remaining_amount > 0;
INSERT INTO claims (coupon_name, user_id, message_id)
VALUES ('PGBENCH_HOT', gen_random_uuid()::text, gen_random_uuid());
END;
