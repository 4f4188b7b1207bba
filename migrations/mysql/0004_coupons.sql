-- Coupons: a percentage or a fixed amount off a package's price, or bonus credits (the same
-- tables as migrations/sqlite).

CREATE TABLE coupons (
    -- Upper case; codes are matched case-insensitively.
    code                  VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    kind                  VARCHAR(16)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    -- Hundredths of a percent (1250 = 12.5 %).
    percent_off_bp        BIGINT       NULL,
    -- In `currency`'s minor unit.
    amount_off            BIGINT       NULL,
    currency              VARCHAR(3)   CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    bonus_credits         BIGINT       NOT NULL DEFAULT 0,
    valid_from            BIGINT       NULL,
    valid_until           BIGINT       NULL,
    max_uses              BIGINT       NULL,
    max_uses_per_account  BIGINT       NULL,
    -- Applies to packages costing at least this package's price.
    min_package           VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    active                BIGINT       NOT NULL DEFAULT 1,
    -- Orders holding a use: counted under the coupon's row lock, released if the order fails.
    uses                  BIGINT       NOT NULL DEFAULT 0,
    created_at            BIGINT       NOT NULL,
    updated_at            BIGINT       NOT NULL,
    PRIMARY KEY (code),
    CONSTRAINT coupons_kind CHECK (kind IN ('percent', 'fixed', 'bonus'))
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE coupon_redemptions (
    order_id     VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    code         VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    account_id   VARCHAR(191) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    created_at   BIGINT       NOT NULL,
    released_at  BIGINT       NULL,
    PRIMARY KEY (order_id),
    KEY coupon_redemptions_by_account (code, account_id)
) ENGINE = InnoDB DEFAULT CHARACTER SET = utf8mb4 COLLATE = utf8mb4_bin;
