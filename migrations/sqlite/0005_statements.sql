-- Monthly usage statements: one per account and month, rebuilt from usage_records on request.
CREATE TABLE usage_statements (
    account_id     TEXT    NOT NULL,
    billing_month  TEXT    NOT NULL,
    -- The statement as generated (JSON).
    document       TEXT    NOT NULL,
    generated_at   INTEGER NOT NULL,
    PRIMARY KEY (account_id, billing_month)
);
