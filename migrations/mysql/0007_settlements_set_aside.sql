-- Settlements the ledger refused on their own while it answered (say, a record it cannot
-- store), kept for an admin instead of being retried forever: nothing was charged for them.
-- No foreign key to accounts: a refused settlement may name an account the ledger never took.
CREATE TABLE settlements_set_aside (
    request_id     VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    -- TEXT, not VARCHAR(191): a refused settlement may carry an account id the ledger refuses.
    account_id     TEXT         NOT NULL,
    -- The serialized settlement, as it was refused (its journal record): LONGTEXT holds any
    -- record, the 64 KiB model name that no TEXT column takes included.
    record         LONGTEXT     NOT NULL,
    -- Why the ledger refused it (its last error).
    error          TEXT         NOT NULL,
    set_aside_at   BIGINT       NOT NULL,
    -- Set once an admin has dealt with it, with their note.
    resolved_at    BIGINT       NULL,
    resolved_note  TEXT         NULL,
    PRIMARY KEY (request_id),
    KEY settlements_set_aside_by_time (set_aside_at)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;
