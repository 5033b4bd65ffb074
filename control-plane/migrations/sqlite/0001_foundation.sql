-- Foundation: admin API keys, orgs, leases for singleton background work.
-- Times are milliseconds since the Unix epoch (INTEGER is 64-bit in SQLite).

CREATE TABLE admin_keys (
    id             TEXT    PRIMARY KEY NOT NULL,
    name           TEXT    NOT NULL,
    -- space-separated scope names, e.g. "orgs:write read"
    scopes         TEXT    NOT NULL,
    -- SHA-256 of the token; the token itself is never stored
    token_hash     BLOB    NOT NULL UNIQUE,
    -- 1 on the bootstrap credential, NULL otherwise: the unique index lets exactly one exist
    bootstrap_slot INTEGER UNIQUE CHECK (bootstrap_slot = 1),
    created_at_ms  INTEGER NOT NULL,
    revoked_at_ms  INTEGER
) STRICT;

CREATE TABLE orgs (
    id            TEXT    PRIMARY KEY NOT NULL,
    name          TEXT    NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL
) STRICT;

CREATE TABLE leases (
    name          TEXT    PRIMARY KEY NOT NULL,
    holder        TEXT    NOT NULL,
    expires_at_ms INTEGER NOT NULL
) STRICT;
