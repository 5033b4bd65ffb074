-- A signed request's nonce is kept with the moment the request's timestamp leaves the
-- window, and a replay, being the same signed bytes, carries the same timestamp. Keyed by
-- (expires_at_ms, agent_id, nonce), the records of concurrent requests land side by side
-- at the end of the key, so a batch of them changes a page or two rather than one page
-- of a random place each, and the expired ones are the key's first rows.
CREATE TABLE agent_request_nonces_by_expiry (
    expires_at_ms INTEGER NOT NULL,
    agent_id      TEXT    NOT NULL,
    nonce         TEXT    NOT NULL,
    PRIMARY KEY (expires_at_ms, agent_id, nonce)
) STRICT, WITHOUT ROWID;
INSERT INTO agent_request_nonces_by_expiry (expires_at_ms, agent_id, nonce)
SELECT expires_at_ms, agent_id, nonce FROM agent_request_nonces;
DROP TABLE agent_request_nonces;
ALTER TABLE agent_request_nonces_by_expiry RENAME TO agent_request_nonces;
