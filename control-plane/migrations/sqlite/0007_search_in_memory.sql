-- Search moves into each replica's memory: the registry keeps only `agents`, and every
-- change a search must see is numbered in `agents.change_seq` from one counter
-- (`registry_meta.change_seq`), taken under its row lock, so numbers commit in order
-- and a replica can follow them. Heartbeats are followed by `last_heartbeat_ms`.

DROP TABLE agent_search;
DROP TABLE agent_capabilities;
DROP TABLE agent_tags;
DROP TABLE search_term_trigrams;
DROP TABLE search_terms;
DROP INDEX agents_public_by_trust;

DELETE FROM registry_meta WHERE key = 'index_version';
INSERT INTO registry_meta (key, value) VALUES ('change_seq', 0);

-- Rows written before this migration keep 0: a replica starts reading after -1.
ALTER TABLE agents ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
CREATE INDEX agents_changes ON agents (change_seq, id);
CREATE INDEX agents_heartbeats ON agents (last_heartbeat_ms, id);
