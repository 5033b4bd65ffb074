-- Every signed agent request inserts its nonce, checked against the primary key (agent,
-- nonce), hundreds per statement. As for ledger ids (0017), compare them byte by byte
-- instead of through the C library's locale-aware strcoll; they are ASCII and sort the
-- same either way.
ALTER TABLE agent_request_nonces ALTER COLUMN agent_id TYPE TEXT COLLATE "C";
ALTER TABLE agent_request_nonces ALTER COLUMN nonce TYPE TEXT COLLATE "C";
