-- Where other edges reach an edge for edge-to-edge links: a JSON array of "host:port"
-- addresses, empty when the edge takes no links.
ALTER TABLE edges ADD COLUMN peer_addrs TEXT NOT NULL DEFAULT '[]';
