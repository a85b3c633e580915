CREATE TABLE IF NOT EXISTS idempotency_records (
    scope         bytea    NOT NULL, -- SHA-256 of the caller's scope
    key           text     NOT NULL, -- the Idempotency-Key, 1..=255 chars
    fingerprint   bytea    NOT NULL, -- SHA-256 of the request
    lease_token   bytea,             -- 16 bytes while in flight, NULL once completed
    expires_at    bigint   NOT NULL, -- Unix ms: lease deadline, then end of replay
    status        smallint,          -- NULL while in flight
    header_names  text[],            -- replayed headers, in order, repeats kept
    header_values bytea[],
    body          bytea,             -- NULL when completed without a stored body
    PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS idempotency_records_expires_at_idx
    ON idempotency_records (expires_at);
