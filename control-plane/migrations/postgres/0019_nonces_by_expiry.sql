-- A signed request's nonce is kept with the moment the request's timestamp leaves the
-- window, and a replay, being the same signed bytes, carries the same timestamp. Keyed by
-- (expires_at_ms, agent_id, nonce), the records of concurrent requests land side by side
-- at the end of the key, so a batch of them changes a page or two of the index rather
-- than one page of a random place each, and the expired ones are the key's first rows.
ALTER TABLE agent_request_nonces DROP CONSTRAINT agent_request_nonces_pkey;
ALTER TABLE agent_request_nonces ADD PRIMARY KEY (expires_at_ms, agent_id, nonce);
DROP INDEX agent_request_nonces_expiry;
