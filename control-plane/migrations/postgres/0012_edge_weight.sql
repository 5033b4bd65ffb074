-- The edge map (`GET /v1/edge-map`): an admin-set weight per edge, which agents combine
-- with the round-trip time they measure when they choose an edge. Higher is preferred;
-- 100 is neutral.

ALTER TABLE edges ADD COLUMN weight BIGINT NOT NULL DEFAULT 100 CHECK (weight BETWEEN 1 AND 1000);

-- The map lists edges seen recently.
CREATE INDEX edges_by_last_seen ON edges (last_seen_ms);
