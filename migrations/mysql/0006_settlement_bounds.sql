-- The hold bounds the charge (DESIGN.md I1): usage priced above its hold is charged the hold,
-- and the excess is recorded here, never taken from the balance.
ALTER TABLE usage_records ADD COLUMN uncharged BIGINT NOT NULL DEFAULT 0;
