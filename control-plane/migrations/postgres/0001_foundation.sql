-- Foundation: admin API keys, orgs, leases for singleton background work.
-- Times are milliseconds since the Unix epoch.

CREATE TABLE admin_keys (
    id             TEXT   PRIMARY KEY,
    name           TEXT   NOT NULL,
    -- space-separated scope names, e.g. "orgs:write read"
    scopes         TEXT   NOT NULL,
    -- SHA-256 of the token; the token itself is never stored
    token_hash     BYTEA  NOT NULL UNIQUE,
    -- 1 on the bootstrap credential, NULL otherwise: the unique index lets exactly one exist
    bootstrap_slot BIGINT UNIQUE CHECK (bootstrap_slot = 1),
    created_at_ms  BIGINT NOT NULL,
    revoked_at_ms  BIGINT
);

CREATE TABLE orgs (
    id            TEXT   PRIMARY KEY,
    -- byte order, like SQLite's BINARY, so listings page the same on both backends
    name          TEXT   NOT NULL UNIQUE COLLATE "C",
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE leases (
    name          TEXT   PRIMARY KEY,
    holder        TEXT   NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
