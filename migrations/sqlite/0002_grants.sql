-- Credit grants with expiry. Runs outside sqlx's transaction (foreign keys must be off while
-- credit_transactions is rebuilt to allow the new `expiry` entry type), so it opens its own.
PRAGMA foreign_keys = OFF;
BEGIN IMMEDIATE;

CREATE TABLE credit_transactions_v2 (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id      TEXT    NOT NULL REFERENCES accounts (id),
    type            TEXT    NOT NULL CHECK (type IN ('purchase', 'usage', 'refund', 'bonus', 'adjustment', 'expiry')),
    amount          INTEGER NOT NULL,
    balance_before  INTEGER NOT NULL,
    balance_after   INTEGER NOT NULL CHECK (balance_after = balance_before + amount),
    description     TEXT    NOT NULL DEFAULT '',
    reference       TEXT,
    created_at      INTEGER NOT NULL,
    UNIQUE (account_id, type, reference)
);
INSERT INTO credit_transactions_v2
    SELECT id, account_id, type, amount, balance_before, balance_after, description, reference, created_at
    FROM credit_transactions ORDER BY id;
-- AUTOINCREMENT never reuses an id: carry the old table's high-water mark over.
UPDATE sqlite_sequence
    SET seq = MAX(seq, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'credit_transactions'), 0))
    WHERE name = 'credit_transactions_v2';
DROP TABLE credit_transactions;
ALTER TABLE credit_transactions_v2 RENAME TO credit_transactions;
CREATE INDEX credit_transactions_by_account ON credit_transactions (account_id, id);

-- Usage and debits that no grant covered; paid off first by the next grant.
ALTER TABLE accounts ADD COLUMN debt INTEGER NOT NULL DEFAULT 0 CHECK (debt >= 0);

CREATE TABLE credit_grants (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id      TEXT    NOT NULL REFERENCES accounts (id),
    -- The entry type that brought the credits (purchase, bonus, adjustment, refund), or
    -- 'migrated' for balances that existed before grants.
    source          TEXT    NOT NULL,
    transaction_id  INTEGER REFERENCES credit_transactions (id),
    amount          INTEGER NOT NULL CHECK (amount > 0),
    -- Part of `amount` that paid off debt when the grant arrived.
    debt_paid       INTEGER NOT NULL DEFAULT 0 CHECK (debt_paid >= 0),
    remaining       INTEGER NOT NULL CHECK (remaining >= 0),
    expires_at      INTEGER,
    -- Set by the expiry sweep; a swept grant no longer counts in the balance.
    expired_at      INTEGER,
    created_at      INTEGER NOT NULL,
    CHECK (remaining + debt_paid <= amount)
);
CREATE INDEX credit_grants_live ON credit_grants (account_id, expired_at);
CREATE INDEX credit_grants_expiring ON credit_grants (expired_at, expires_at);

-- Which grants each debit (usage, negative adjustment, expiry) drew from.
CREATE TABLE grant_draws (
    transaction_id  INTEGER NOT NULL REFERENCES credit_transactions (id),
    grant_id        INTEGER NOT NULL REFERENCES credit_grants (id),
    amount          INTEGER NOT NULL CHECK (amount > 0),
    PRIMARY KEY (transaction_id, grant_id)
);
CREATE INDEX grant_draws_by_grant ON grant_draws (grant_id);

-- Balances from before grants become never-expiring grants (or debt), so that
-- balance = sum of unswept remainders - debt holds from the start.
INSERT INTO credit_grants (account_id, source, transaction_id, amount, debt_paid, remaining, expires_at, expired_at, created_at)
    SELECT id, 'migrated', NULL, balance, 0, balance, NULL, NULL, updated_at FROM accounts WHERE balance > 0
    ORDER BY id;
UPDATE accounts SET debt = -balance WHERE balance < 0;

COMMIT;
PRAGMA foreign_keys = ON;
