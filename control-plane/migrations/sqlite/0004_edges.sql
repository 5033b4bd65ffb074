-- Edges known to the control plane (registered over gRPC) and which agents are connected
-- to which edge. Times are milliseconds since the Unix epoch.

CREATE TABLE edges (
    id                TEXT    PRIMARY KEY NOT NULL,
    region            TEXT    NOT NULL,
    -- JSON array of "host:port" QUIC addresses
    quic_addrs        TEXT    NOT NULL,
    version           TEXT    NOT NULL,
    registered_at_ms  INTEGER NOT NULL,
    last_seen_ms      INTEGER NOT NULL
) STRICT;

-- One row per connected agent: the edge of the latest report naming it.
CREATE TABLE edge_presence (
    agent_id        TEXT    PRIMARY KEY NOT NULL,
    edge_id         TEXT    NOT NULL REFERENCES edges (id) ON DELETE CASCADE,
    reported_at_ms  INTEGER NOT NULL
) STRICT;

CREATE INDEX edge_presence_by_edge ON edge_presence (edge_id);
