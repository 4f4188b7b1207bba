-- Tollgate ledger, MySQL 8 / MariaDB 10.11 dialect (the same tables as migrations/sqlite).
-- Amounts are integer micro-credits (1 credit = 1,000,000) in BIGINT, never DECIMAL or FLOAT.
-- Timestamps are Unix milliseconds (UTC) in BIGINT.
--
-- Every table is InnoDB (row locks, foreign keys, crash-safe) in utf8mb4 with the binary
-- collation, so ids compare byte for byte: account ids are case-sensitive, as in SQLite.
-- Indexed strings are VARCHAR(191): 191 x 4 bytes stays under InnoDB's older 767-byte index
-- prefix limit. The table options are spelled out so the database's defaults do not matter.

CREATE TABLE accounts (
    id          VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    balance     BIGINT       NOT NULL DEFAULT 0,
    -- Bumped on every balance change, so a cache can tell a newer snapshot from an older one.
    rev         BIGINT       NOT NULL DEFAULT 0,
    created_at  BIGINT       NOT NULL,
    updated_at  BIGINT       NOT NULL,
    PRIMARY KEY (id)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE credit_transactions (
    id              BIGINT       NOT NULL AUTO_INCREMENT,
    account_id      VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    `type`          VARCHAR(16)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    amount          BIGINT       NOT NULL,
    balance_before  BIGINT       NOT NULL,
    balance_after   BIGINT       NOT NULL,
    description     TEXT         NOT NULL,
    -- Idempotency key: the request id of a usage entry, the caller's key of a grant.
    reference       VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    created_at      BIGINT       NOT NULL,
    PRIMARY KEY (id),
    -- NULL references never collide, as in SQLite: only referenced entries are idempotent.
    UNIQUE KEY credit_transactions_reference (account_id, `type`, reference),
    -- Paging: newest first per account (`WHERE account_id = ? AND id < ? ORDER BY id DESC`).
    KEY credit_transactions_by_account (account_id, id),
    CONSTRAINT credit_transactions_account FOREIGN KEY (account_id) REFERENCES accounts (id),
    CONSTRAINT credit_transactions_type
        CHECK (`type` IN ('purchase', 'usage', 'refund', 'bonus', 'adjustment')),
    CONSTRAINT credit_transactions_chain CHECK (balance_after = balance_before + amount)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE usage_records (
    -- The paging cursor (SQLite pages by its implicit rowid; InnoDB has none to expose).
    id                  BIGINT       NOT NULL AUTO_INCREMENT,
    request_id          VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    account_id          VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    api_key_id          VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    endpoint            VARCHAR(191) NOT NULL,
    model               TEXT         NOT NULL,
    upstream            TEXT         NOT NULL,
    prompt_tokens       BIGINT       NOT NULL,
    completion_tokens   BIGINT       NOT NULL,
    cached_tokens       BIGINT       NOT NULL,
    cost                BIGINT       NOT NULL,
    -- What was reserved for the request; cost > hold means the estimate fell short.
    hold                BIGINT       NOT NULL,
    source              VARCHAR(16)  NOT NULL,
    stream              BOOLEAN      NOT NULL,
    status              VARCHAR(191) NOT NULL,
    started_at          BIGINT       NOT NULL,
    finished_at         BIGINT       NOT NULL,
    settled_at          BIGINT       NOT NULL,
    -- The ledger entry that charged this usage (absent only for zero-cost usage).
    transaction_id      BIGINT       NULL,
    PRIMARY KEY (id),
    -- Exactly once (DESIGN.md I2): a request id is settled at most once.
    UNIQUE KEY usage_records_request (request_id),
    KEY usage_records_by_account (account_id, id),
    CONSTRAINT usage_records_account FOREIGN KEY (account_id) REFERENCES accounts (id),
    CONSTRAINT usage_records_transaction
        FOREIGN KEY (transaction_id) REFERENCES credit_transactions (id),
    CONSTRAINT usage_records_source CHECK (source IN ('reported', 'counted'))
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE api_keys (
    id              VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    account_id      VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    -- SHA-256 of the whole key, hex; the key itself is never stored.
    key_hash        VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    prefix          VARCHAR(191) NOT NULL,
    name            TEXT         NOT NULL,
    spend_limit     BIGINT       NULL,
    spent           BIGINT       NOT NULL DEFAULT 0,
    rev             BIGINT       NOT NULL DEFAULT 0,
    -- JSON array of model names/patterns, or NULL for every model.
    allowed_models  TEXT         NULL,
    created_at      BIGINT       NOT NULL,
    revoked_at      BIGINT       NULL,
    PRIMARY KEY (id),
    UNIQUE KEY api_keys_hash (key_hash),
    -- Listing an account's keys in creation order.
    KEY api_keys_by_account (account_id, created_at, id),
    CONSTRAINT api_keys_account FOREIGN KEY (account_id) REFERENCES accounts (id)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;

-- One row; bumped by every change made outside a running gateway's own request path (CLI,
-- admin API), so each gateway knows to drop its in-process key and balance caches.
CREATE TABLE cache_epoch (
    id      TINYINT NOT NULL,
    epoch   BIGINT  NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT cache_epoch_single_row CHECK (id = 1)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;
INSERT INTO cache_epoch (id, epoch) VALUES (1, 0);
