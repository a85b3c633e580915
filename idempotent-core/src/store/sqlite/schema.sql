CREATE TABLE IF NOT EXISTS idempotency_records (
    scope       BLOB    NOT NULL, -- SHA-256 of the caller's scope
    key         TEXT    NOT NULL, -- the Idempotency-Key, 1..=255 chars
    fingerprint BLOB    NOT NULL, -- SHA-256 of the request
    lease_token BLOB,             -- 16 bytes while in flight, NULL once completed
    expires_at  INTEGER NOT NULL, -- Unix ms: lease deadline, then end of replay
    record      BLOB,             -- the completed response (binary codec), NULL while in flight
    PRIMARY KEY (scope, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS idempotency_records_expires_at_idx
    ON idempotency_records (expires_at);
