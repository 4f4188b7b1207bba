-- Coupons: a percentage or a fixed amount off a package's price, or bonus credits.

CREATE TABLE coupons (
    -- Upper case; codes are matched case-insensitively.
    code                  TEXT    PRIMARY KEY NOT NULL,
    kind                  TEXT    NOT NULL CHECK (kind IN ('percent', 'fixed', 'bonus')),
    -- Hundredths of a percent (1250 = 12.5 %).
    percent_off_bp        INTEGER,
    -- In `currency`'s minor unit.
    amount_off            INTEGER,
    currency              TEXT,
    bonus_credits         INTEGER NOT NULL DEFAULT 0,
    valid_from            INTEGER,
    valid_until           INTEGER,
    max_uses              INTEGER,
    max_uses_per_account  INTEGER,
    -- Applies to packages costing at least this package's price.
    min_package           TEXT,
    active                INTEGER NOT NULL DEFAULT 1,
    -- Orders holding a use: counted under the coupon's row lock, released if the order fails.
    uses                  INTEGER NOT NULL DEFAULT 0,
    created_at            INTEGER NOT NULL,
    updated_at            INTEGER NOT NULL
);

CREATE TABLE coupon_redemptions (
    order_id     TEXT    PRIMARY KEY NOT NULL,
    code         TEXT    NOT NULL,
    account_id   TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    released_at  INTEGER
);
CREATE INDEX coupon_redemptions_by_account ON coupon_redemptions (code, account_id);
