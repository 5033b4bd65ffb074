-- Search index, second layout: impact-ordered postings, a vocabulary of name terms for
-- typo tolerance, and the trust score denormalised into every row search orders by.
-- The old index tables are dropped; the registry rebuilds the new ones from `agents` at
-- start when `registry_meta.index_version` is behind (see registry::ensure_index).

DROP TABLE agent_search;
DROP TABLE agent_name_trigrams;
DROP TABLE agent_capabilities;
DROP TABLE agent_tags;

-- Trust factor in [0, 1] written by the trust engine; 0.5 is neutral.
ALTER TABLE agents ADD COLUMN trust DOUBLE PRECISION NOT NULL DEFAULT 0.5;
-- Listing public agents without a query, best trust first.
CREATE INDEX agents_public_by_trust ON agents (trust DESC, id) WHERE visibility = 'public';

-- One posting per (term, public agent): the best field the term occurs in (name 3,
-- capability 2, description 1) and impact = weight × trust, the order postings are read in.
CREATE TABLE agent_search (
    token    TEXT COLLATE "C" NOT NULL,
    agent_id TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    weight   BIGINT NOT NULL,
    impact   DOUBLE PRECISION NOT NULL
);
CREATE INDEX agent_search_postings ON agent_search (token, impact DESC, agent_id, weight);
CREATE INDEX agent_search_agent ON agent_search (agent_id, token, weight);

-- Capabilities and tags of public agents, ordered by trust for filter-only listings.
CREATE TABLE agent_capabilities (
    name     TEXT COLLATE "C" NOT NULL,
    agent_id TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    trust    DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (name, agent_id)
);
CREATE INDEX agent_capabilities_by_trust ON agent_capabilities (name, trust DESC, agent_id);
CREATE INDEX agent_capabilities_agent ON agent_capabilities (agent_id);

CREATE TABLE agent_tags (
    tag      TEXT COLLATE "C" NOT NULL,
    agent_id TEXT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    trust    DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (tag, agent_id)
);
CREATE INDEX agent_tags_by_trust ON agent_tags (tag, trust DESC, agent_id);
CREATE INDEX agent_tags_agent ON agent_tags (agent_id);

-- Every term ever seen in a public name, and its trigrams (with ^ and $ boundary marks):
-- typo-tolerant and prefix matching search this vocabulary, then read postings.
CREATE TABLE search_terms (
    term TEXT COLLATE "C" PRIMARY KEY NOT NULL
);
CREATE TABLE search_term_trigrams (
    trigram TEXT COLLATE "C" NOT NULL,
    term    TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (trigram, term)
);

CREATE TABLE registry_meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value BIGINT NOT NULL
);
INSERT INTO registry_meta (key, value) VALUES ('index_version', 0);
