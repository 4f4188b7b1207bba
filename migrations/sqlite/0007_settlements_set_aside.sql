-- Settlements the ledger refused on their own while it answered (say, a record it cannot
-- store), kept for an admin instead of being retried forever: nothing was charged for them.
-- No foreign key to accounts: a refused settlement may name an account the ledger never took.
CREATE TABLE settlements_set_aside (
    request_id     TEXT    PRIMARY KEY NOT NULL,
    account_id     TEXT    NOT NULL,
    -- The serialized settlement, as it was refused (its journal record).
    record         TEXT    NOT NULL,
    -- Why the ledger refused it (its last error).
    error          TEXT    NOT NULL,
    set_aside_at   INTEGER NOT NULL,
    -- Set once an admin has dealt with it, with their note.
    resolved_at    INTEGER,
    resolved_note  TEXT
);
CREATE INDEX settlements_set_aside_by_time ON settlements_set_aside (set_aside_at);
