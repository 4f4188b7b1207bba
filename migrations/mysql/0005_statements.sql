-- Monthly usage statements: one per account and month, rebuilt from usage_records on request.
CREATE TABLE usage_statements (
    account_id     VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    billing_month  VARCHAR(7)   CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    -- The statement as generated (JSON).
    document       MEDIUMTEXT   NOT NULL,
    generated_at   BIGINT       NOT NULL,
    PRIMARY KEY (account_id, billing_month)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;
