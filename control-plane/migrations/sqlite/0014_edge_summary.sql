-- The fleet view (`GET /v1/admin/edges`): the metrics summary that came with each edge's
-- latest presence report, as JSON (`edge_map::EdgeSummary`), and when it came. NULL until
-- the edge sends one.

ALTER TABLE edges ADD COLUMN summary TEXT;
ALTER TABLE edges ADD COLUMN summary_at_ms INTEGER;
