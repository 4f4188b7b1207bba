-- Payments: orders, the credit moves they cause, processed provider events, invoices (the same
-- tables as migrations/sqlite). Money paid is in the currency's minor unit (cents); credits are
-- micro-credits.

CREATE TABLE orders (
    seq                 BIGINT       NOT NULL AUTO_INCREMENT,
    id                  VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    account_id          VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    package_id          VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    description         TEXT         NOT NULL,
    provider            VARCHAR(32)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    status              VARCHAR(32)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    -- The hosted checkout Tollgate created (a Stripe session, a Lemon Squeezy checkout).
    checkout_id         VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    checkout_url        TEXT         NULL,
    -- The provider's id of the payment: the natural key no replay can credit twice.
    provider_order_id   VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    -- Where refunds and disputes point (a Stripe PaymentIntent).
    payment_ref         VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    credits             BIGINT       NOT NULL,
    bonus_credits       BIGINT       NOT NULL DEFAULT 0,
    validity_days       INT          NULL,
    currency            VARCHAR(3)   CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    list_amount         BIGINT       NOT NULL,
    discount_amount     BIGINT       NOT NULL DEFAULT 0,
    amount              BIGINT       NOT NULL,
    paid_amount         BIGINT       NULL,
    refunded_amount     BIGINT       NOT NULL DEFAULT 0,
    credits_refunded    BIGINT       NOT NULL DEFAULT 0,
    dispute_id          VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    dispute_status      VARCHAR(16)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    dispute_credits     BIGINT       NOT NULL DEFAULT 0,
    coupon_code         VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    invoice_id          VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    buyer_email         TEXT         NULL,
    buyer_name          TEXT         NULL,
    review_reason       TEXT         NULL,
    grant_expires_at    BIGINT       NULL,
    created_at          BIGINT       NOT NULL,
    updated_at          BIGINT       NOT NULL,
    paid_at             BIGINT       NULL,
    refunded_at         BIGINT       NULL,
    closed_at           BIGINT       NULL,
    PRIMARY KEY (seq),
    UNIQUE KEY orders_id (id),
    UNIQUE KEY orders_provider_order (provider, provider_order_id),
    KEY orders_by_account (account_id, seq),
    KEY orders_by_payment (provider, payment_ref)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;

-- Every credit change an order causes, written with the order's change and then applied to the
-- ledger under the same reference (idempotent there): an outbox, so nothing is lost between.
CREATE TABLE order_credit_moves (
    reference    VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    order_id     VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    account_id   VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    entry_type   VARCHAR(16)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    amount       BIGINT       NOT NULL,
    description  TEXT         NOT NULL,
    expires_at   BIGINT       NULL,
    created_at   BIGINT       NOT NULL,
    applied_at   BIGINT       NULL,
    PRIMARY KEY (reference),
    KEY order_credit_moves_by_order (order_id),
    KEY order_credit_moves_pending (applied_at)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;

-- Each provider event once. `payload` is kept only for events left for an admin.
CREATE TABLE payment_events (
    seq          BIGINT       NOT NULL AUTO_INCREMENT,
    provider     VARCHAR(32)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    event_id     VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    event_type   VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    outcome      VARCHAR(16)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    order_id     VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    detail       TEXT         NOT NULL,
    payload      MEDIUMTEXT   NULL,
    received_at  BIGINT       NOT NULL,
    PRIMARY KEY (seq),
    UNIQUE KEY payment_events_id (provider, event_id),
    KEY payment_events_by_outcome (outcome, seq)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE invoices (
    id          VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    number      VARCHAR(32)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    order_id    VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    account_id  VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    issued_at   BIGINT       NOT NULL,
    -- The whole invoice as issued (JSON), frozen: later config changes do not alter it.
    document    MEDIUMTEXT   NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY invoices_number (number),
    UNIQUE KEY invoices_order (order_id)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;

-- The last invoice number of each year; taken under the row's lock in the issuing transaction,
-- so numbers have no gaps.
CREATE TABLE invoice_counters (
    year         INT    NOT NULL,
    last_number  BIGINT NOT NULL,
    PRIMARY KEY (year)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;
