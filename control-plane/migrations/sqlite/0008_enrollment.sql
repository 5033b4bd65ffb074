-- Enrollment tokens: single-use, expiring secrets an admin hands to the operator of a new
-- edge. Only the SHA-256 of a token is stored. A token is consumed by one conditional
-- UPDATE (used_at_ms IS NULL AND revoked_at_ms IS NULL AND expires_at_ms > now), so of
-- two concurrent enrollments exactly one wins. Times are milliseconds since the Unix epoch.

CREATE TABLE enrollment_tokens (
    id                       TEXT    PRIMARY KEY NOT NULL,
    token_hash               BLOB    NOT NULL UNIQUE,
    org_id                   TEXT    NOT NULL REFERENCES orgs (id),
    region                   TEXT    NOT NULL,
    -- lifetime of the certificates issued to the enrolled edge (and its renewals)
    certificate_validity_ms  INTEGER NOT NULL CHECK (certificate_validity_ms > 0),
    created_by               TEXT    NOT NULL,
    created_at_ms            INTEGER NOT NULL,
    expires_at_ms            INTEGER NOT NULL,
    used_at_ms               INTEGER,
    -- the edge id the token enrolled
    used_by_edge             TEXT,
    revoked_at_ms            INTEGER
) STRICT;
