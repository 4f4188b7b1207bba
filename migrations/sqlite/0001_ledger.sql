-- Tollgate ledger, SQLite dialect. Amounts are integer micro-credits (1 credit = 1,000,000).
-- Timestamps are Unix milliseconds (UTC).

CREATE TABLE accounts (
    id          TEXT    PRIMARY KEY NOT NULL,
    balance     INTEGER NOT NULL DEFAULT 0,
    -- Bumped on every balance change, so a cache can tell a newer snapshot from an older one.
    rev         INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE credit_transactions (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id      TEXT    NOT NULL REFERENCES accounts (id),
    type            TEXT    NOT NULL CHECK (type IN ('purchase', 'usage', 'refund', 'bonus', 'adjustment')),
    amount          INTEGER NOT NULL,
    balance_before  INTEGER NOT NULL,
    balance_after   INTEGER NOT NULL CHECK (balance_after = balance_before + amount),
    description     TEXT    NOT NULL DEFAULT '',
    -- Idempotency key: the request id of a usage entry, the caller's key of a grant.
    reference       TEXT,
    created_at      INTEGER NOT NULL,
    UNIQUE (account_id, type, reference)
);
CREATE INDEX credit_transactions_by_account ON credit_transactions (account_id, id);

CREATE TABLE usage_records (
    request_id          TEXT    PRIMARY KEY NOT NULL,
    account_id          TEXT    NOT NULL REFERENCES accounts (id),
    api_key_id          TEXT,
    endpoint            TEXT    NOT NULL,
    model               TEXT    NOT NULL,
    upstream            TEXT    NOT NULL,
    prompt_tokens       INTEGER NOT NULL,
    completion_tokens   INTEGER NOT NULL,
    cached_tokens       INTEGER NOT NULL,
    cost                INTEGER NOT NULL,
    -- What was reserved for the request; cost > hold means the estimate fell short.
    hold                INTEGER NOT NULL,
    source              TEXT    NOT NULL CHECK (source IN ('reported', 'counted')),
    stream              INTEGER NOT NULL,
    status              TEXT    NOT NULL,
    started_at          INTEGER NOT NULL,
    finished_at         INTEGER NOT NULL,
    settled_at          INTEGER NOT NULL,
    -- The ledger entry that charged this usage (absent only for zero-cost usage).
    transaction_id      INTEGER REFERENCES credit_transactions (id)
);
CREATE INDEX usage_records_by_account ON usage_records (account_id, settled_at);

CREATE TABLE api_keys (
    id              TEXT    PRIMARY KEY NOT NULL,
    account_id      TEXT    NOT NULL REFERENCES accounts (id),
    -- SHA-256 of the whole key, hex; the key itself is never stored.
    key_hash        TEXT    NOT NULL UNIQUE,
    prefix          TEXT    NOT NULL,
    name            TEXT    NOT NULL DEFAULT '',
    spend_limit     INTEGER,
    spent           INTEGER NOT NULL DEFAULT 0,
    rev             INTEGER NOT NULL DEFAULT 0,
    -- JSON array of model names/patterns, or NULL for every model.
    allowed_models  TEXT,
    created_at      INTEGER NOT NULL,
    revoked_at      INTEGER
);
CREATE INDEX api_keys_by_account ON api_keys (account_id);

-- One row; bumped by every change made outside a running gateway's own request path (CLI,
-- admin API), so each gateway knows to drop its in-process key and balance caches.
CREATE TABLE cache_epoch (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    epoch   INTEGER NOT NULL
);
INSERT INTO cache_epoch (id, epoch) VALUES (1, 0);
