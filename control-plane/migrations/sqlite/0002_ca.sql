-- Certificate authority: the development root, org CAs, issued leaves, revocations and
-- the trust bundle's sequence number. Private keys are stored sealed with the
-- key-encryption key (ChaCha20-Poly1305: 12-byte nonce ‖ ciphertext ‖ tag).

-- The generated development root (absent when the root comes from files).
CREATE TABLE ca_root (
    id              INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    certificate_pem TEXT    NOT NULL,
    key_sealed      BLOB    NOT NULL,
    created_at_ms   INTEGER NOT NULL
) STRICT;

CREATE TABLE org_cas (
    org_id          TEXT    PRIMARY KEY NOT NULL REFERENCES orgs (id),
    -- 32 lower-case hex digits
    serial          TEXT    NOT NULL UNIQUE,
    certificate_pem TEXT    NOT NULL,
    key_sealed      BLOB    NOT NULL,
    -- number of the org's current CRL: grows with every revocation, never goes back
    crl_number      INTEGER NOT NULL CHECK (crl_number >= 1),
    created_at_ms   INTEGER NOT NULL
) STRICT;

CREATE TABLE certificates (
    serial            TEXT    PRIMARY KEY NOT NULL,
    org_id            TEXT    NOT NULL REFERENCES org_cas (org_id),
    -- 'agent' or 'edge'
    kind              TEXT    NOT NULL CHECK (kind IN ('agent', 'edge')),
    subject_id        TEXT    NOT NULL,
    public_key        BLOB    NOT NULL,
    certificate_pem   TEXT    NOT NULL,
    not_after_ms      INTEGER NOT NULL,
    created_at_ms     INTEGER NOT NULL,
    revoked_at_ms     INTEGER,
    revocation_reason TEXT
) STRICT;

CREATE INDEX certificates_revoked_by_org ON certificates (org_id, serial) WHERE revoked_at_ms IS NOT NULL;

-- One row: the trust bundle's sequence number, bumped in every transaction that changes it.
CREATE TABLE ca_state (
    id              INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    bundle_sequence INTEGER NOT NULL
) STRICT;

INSERT INTO ca_state (id, bundle_sequence) VALUES (1, 0);
