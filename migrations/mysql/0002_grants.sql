-- Credit grants with expiry: the same tables and data migration as migrations/sqlite/0002.
--
-- MySQL and MariaDB commit each DDL statement on its own, so the schema changes come first and
-- the data migration last: the two DML statements commit together with sqlx's bookkeeping row.

-- The `expiry` entry type. A named CHECK is dropped with DROP CONSTRAINT on both servers
-- (MySQL 8.0.19+, MariaDB 10.2+); MariaDB has no DROP CHECK. CHECK names are unique per schema
-- in MySQL, so the new one can only be added once the old one is gone.
ALTER TABLE credit_transactions DROP CONSTRAINT credit_transactions_type;
ALTER TABLE credit_transactions ADD CONSTRAINT credit_transactions_type
    CHECK (`type` IN ('purchase', 'usage', 'refund', 'bonus', 'adjustment', 'expiry'));

-- Usage and debits that no grant covered; paid off first by the next grant.
ALTER TABLE accounts
    ADD COLUMN debt BIGINT NOT NULL DEFAULT 0,
    ADD CONSTRAINT accounts_debt CHECK (debt >= 0);

CREATE TABLE credit_grants (
    id              BIGINT       NOT NULL AUTO_INCREMENT,
    account_id      VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    -- The entry type that brought the credits (purchase, bonus, adjustment, refund), or
    -- 'migrated' for balances that existed before grants.
    source          VARCHAR(16)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    transaction_id  BIGINT       NULL,
    amount          BIGINT       NOT NULL,
    -- Part of `amount` that paid off debt when the grant arrived.
    debt_paid       BIGINT       NOT NULL DEFAULT 0,
    remaining       BIGINT       NOT NULL,
    expires_at      BIGINT       NULL,
    -- Set by the expiry sweep; a swept grant no longer counts in the balance.
    expired_at      BIGINT       NULL,
    created_at      BIGINT       NOT NULL,
    PRIMARY KEY (id),
    -- An account's live grants (`expired_at IS NULL`), locked by debits.
    KEY credit_grants_live (account_id, expired_at),
    -- The sweep's search: unswept grants due by now.
    KEY credit_grants_expiring (expired_at, expires_at),
    CONSTRAINT credit_grants_account FOREIGN KEY (account_id) REFERENCES accounts (id),
    CONSTRAINT credit_grants_transaction
        FOREIGN KEY (transaction_id) REFERENCES credit_transactions (id),
    CONSTRAINT credit_grants_amount CHECK (amount > 0),
    CONSTRAINT credit_grants_debt_paid CHECK (debt_paid >= 0),
    CONSTRAINT credit_grants_remaining CHECK (remaining >= 0),
    CONSTRAINT credit_grants_total CHECK (remaining + debt_paid <= amount)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;

-- Which grants each debit (usage, negative adjustment, expiry) drew from.
CREATE TABLE grant_draws (
    transaction_id  BIGINT NOT NULL,
    grant_id        BIGINT NOT NULL,
    amount          BIGINT NOT NULL,
    PRIMARY KEY (transaction_id, grant_id),
    KEY grant_draws_by_grant (grant_id),
    CONSTRAINT grant_draws_transaction
        FOREIGN KEY (transaction_id) REFERENCES credit_transactions (id),
    CONSTRAINT grant_draws_grant FOREIGN KEY (grant_id) REFERENCES credit_grants (id),
    CONSTRAINT grant_draws_amount CHECK (amount > 0)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;

-- Balances from before grants become never-expiring grants (or debt), so that
-- balance = sum of unswept remainders - debt holds from the start.
INSERT INTO credit_grants (account_id, source, transaction_id, amount, debt_paid, remaining,
        expires_at, expired_at, created_at)
    SELECT id, 'migrated', NULL, balance, 0, balance, NULL, NULL, updated_at
    FROM accounts WHERE balance > 0 ORDER BY id;
UPDATE accounts SET debt = -balance WHERE balance < 0;
