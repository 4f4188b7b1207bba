-- Payments: orders, the credit moves they cause, processed provider events, invoices.
-- Money paid is in the currency's minor unit (cents); credits are micro-credits.

CREATE TABLE orders (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    id                  TEXT    NOT NULL UNIQUE,
    account_id          TEXT    NOT NULL,
    package_id          TEXT    NOT NULL,
    description         TEXT    NOT NULL,
    provider            TEXT    NOT NULL,
    status              TEXT    NOT NULL,
    -- The hosted checkout Tollgate created (a Stripe session, a Lemon Squeezy checkout).
    checkout_id         TEXT,
    checkout_url        TEXT,
    -- The provider's id of the payment: the natural key no replay can credit twice.
    provider_order_id   TEXT,
    -- Where refunds and disputes point (a Stripe PaymentIntent).
    payment_ref         TEXT,
    credits             INTEGER NOT NULL,
    bonus_credits       INTEGER NOT NULL DEFAULT 0,
    validity_days       INTEGER,
    currency            TEXT    NOT NULL,
    list_amount         INTEGER NOT NULL,
    discount_amount     INTEGER NOT NULL DEFAULT 0,
    amount              INTEGER NOT NULL,
    paid_amount         INTEGER,
    refunded_amount     INTEGER NOT NULL DEFAULT 0,
    credits_refunded    INTEGER NOT NULL DEFAULT 0,
    dispute_id          TEXT,
    dispute_status      TEXT,
    dispute_credits     INTEGER NOT NULL DEFAULT 0,
    coupon_code         TEXT,
    invoice_id          TEXT,
    buyer_email         TEXT,
    buyer_name          TEXT,
    review_reason       TEXT,
    grant_expires_at    INTEGER,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    paid_at             INTEGER,
    refunded_at         INTEGER,
    closed_at           INTEGER,
    UNIQUE (provider, provider_order_id)
);
CREATE INDEX orders_by_account ON orders (account_id, seq);
CREATE INDEX orders_by_payment ON orders (provider, payment_ref);

-- Every credit change an order causes, written with the order's change and then applied to the
-- ledger under the same reference (idempotent there): an outbox, so nothing is lost between.
CREATE TABLE order_credit_moves (
    reference    TEXT    PRIMARY KEY NOT NULL,
    order_id     TEXT    NOT NULL,
    account_id   TEXT    NOT NULL,
    entry_type   TEXT    NOT NULL,
    amount       INTEGER NOT NULL,
    description  TEXT    NOT NULL,
    expires_at   INTEGER,
    created_at   INTEGER NOT NULL,
    applied_at   INTEGER
);
CREATE INDEX order_credit_moves_by_order ON order_credit_moves (order_id);
CREATE INDEX order_credit_moves_pending ON order_credit_moves (applied_at);

-- Each provider event once. `payload` is kept only for events left for an admin.
CREATE TABLE payment_events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    provider     TEXT    NOT NULL,
    event_id     TEXT    NOT NULL,
    event_type   TEXT    NOT NULL,
    outcome      TEXT    NOT NULL,
    order_id     TEXT,
    detail       TEXT    NOT NULL,
    payload      TEXT,
    received_at  INTEGER NOT NULL,
    UNIQUE (provider, event_id)
);
CREATE INDEX payment_events_by_outcome ON payment_events (outcome, seq);

CREATE TABLE invoices (
    id          TEXT    PRIMARY KEY NOT NULL,
    number      TEXT    NOT NULL UNIQUE,
    order_id    TEXT    NOT NULL UNIQUE,
    account_id  TEXT    NOT NULL,
    issued_at   INTEGER NOT NULL,
    -- The whole invoice as issued (JSON), frozen: later config changes do not alter it.
    document    TEXT    NOT NULL
);

-- The last invoice number of each year; taken under the row's lock in the issuing transaction,
-- so numbers have no gaps.
CREATE TABLE invoice_counters (
    year         INTEGER PRIMARY KEY NOT NULL,
    last_number  INTEGER NOT NULL
);
