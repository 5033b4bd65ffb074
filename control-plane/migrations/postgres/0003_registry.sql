-- Registry: agent profiles, denormalised search tables, and the nonces of signed
-- agent requests. Times are milliseconds since the Unix epoch.

CREATE TABLE agents (
    id                TEXT    PRIMARY KEY NOT NULL,
    -- Ed25519 inception key (32 bytes); the id is derived from it
    public_key        BYTEA    NOT NULL,
    name              TEXT    NOT NULL,
    description       TEXT    NOT NULL,
    -- JSON array of {name, version, tags}, as validated
    capabilities      TEXT    NOT NULL,
    -- KeyBinding::encode(), verified against public_key
    key_binding       BYTEA,
    visibility        TEXT    NOT NULL CHECK (visibility IN ('public', 'unlisted', 'private')),
    home_edge         TEXT,
    revision          BIGINT NOT NULL,
    registered_at_ms  BIGINT NOT NULL,
    updated_at_ms     BIGINT NOT NULL,
    last_heartbeat_ms BIGINT NOT NULL,
    expires_at_ms     BIGINT NOT NULL,
    revoked_at_ms     BIGINT
);

-- One row per distinct (token, field) of a public agent: name 3, capability 2, description 1.
CREATE TABLE agent_search (
    token    TEXT    NOT NULL,
    agent_id TEXT    NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    weight   BIGINT NOT NULL,
    PRIMARY KEY (token, agent_id, weight)
);
CREATE INDEX agent_search_agent ON agent_search (agent_id);

-- Trigrams of the name tokens of public agents, for typo-tolerant name candidates.
CREATE TABLE agent_name_trigrams (
    trigram  TEXT NOT NULL,
    agent_id TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    PRIMARY KEY (trigram, agent_id)
);
CREATE INDEX agent_name_trigrams_agent ON agent_name_trigrams (agent_id);

-- Capabilities (and their tags) of every agent, for exact filters.
CREATE TABLE agent_capabilities (
    name     TEXT NOT NULL,
    agent_id TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    PRIMARY KEY (name, agent_id)
);
CREATE INDEX agent_capabilities_agent ON agent_capabilities (agent_id);

CREATE TABLE agent_tags (
    tag      TEXT NOT NULL,
    agent_id TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    PRIMARY KEY (tag, agent_id)
);
CREATE INDEX agent_tags_agent ON agent_tags (agent_id);

-- Nonces of accepted signed requests until their timestamp leaves the window; the
-- primary key makes a replay lose even against another replica.
CREATE TABLE agent_request_nonces (
    agent_id      TEXT    NOT NULL,
    nonce         TEXT    NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    PRIMARY KEY (agent_id, nonce)
);
CREATE INDEX agent_request_nonces_expiry ON agent_request_nonces (expires_at_ms);
