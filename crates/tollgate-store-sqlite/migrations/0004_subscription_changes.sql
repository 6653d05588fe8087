-- A change a subscription makes by itself at a set time (the end of the billing
-- period in which it was asked for): a downgrade to `scheduled_plan`, or, with
-- `cancel_at_period_end`, a fall back to the default plan.
ALTER TABLE subscriptions ADD COLUMN scheduled_plan TEXT;
ALTER TABLE subscriptions ADD COLUMN scheduled_at INTEGER;
