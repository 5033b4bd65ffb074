-- Agent key lifecycle: rotation with an overlap window, guardians and social recovery.
--
-- `agents.public_key` becomes the agent's *current* key (the id stays derived from the
-- inception key, which `agent_key_events` keeps). During a rotation's overlap the key it
-- replaced still signs requests until `previous_key_until_ms`.
ALTER TABLE agents ADD COLUMN previous_key BLOB;
ALTER TABLE agents ADD COLUMN previous_key_until_ms INTEGER;
-- Bumped by every rotation and recovery: a conditional update on it makes two
-- concurrent key changes of one agent fail one of them.
ALTER TABLE agents ADD COLUMN key_epoch INTEGER NOT NULL DEFAULT 0;
-- A new key must not be another agent's current key.
CREATE INDEX agents_by_key ON agents (public_key);

-- A certificate replaced by a rotation (after its overlap) or a recovery (at once) is
-- revoked when this time passes, with this reason.
ALTER TABLE certificates ADD COLUMN revoke_at_ms INTEGER;
ALTER TABLE certificates ADD COLUMN revoke_reason TEXT;
CREATE INDEX certificates_revoke_due ON certificates (revoke_at_ms) WHERE revoke_at_ms IS NOT NULL AND revoked_at_ms IS NULL;
CREATE INDEX certificates_by_subject ON certificates (subject_id, created_at_ms);

-- Every key an agent has had after its inception key, in order.
CREATE TABLE agent_key_events (
    agent_id   TEXT    NOT NULL REFERENCES agents (id),
    epoch      INTEGER NOT NULL,
    -- 'rotation' or 'recovery'
    kind       TEXT    NOT NULL CHECK (kind IN ('rotation', 'recovery')),
    old_key    BLOB    NOT NULL,
    new_key    BLOB    NOT NULL,
    -- the certificate issued for the new key
    serial     TEXT    NOT NULL,
    at_ms      INTEGER NOT NULL,
    PRIMARY KEY (agent_id, epoch)
) STRICT;

-- An agent's guardians: `threshold` of the agents in `guardians` (JSON array of ids) can
-- bind a new key to it after the time lock.
CREATE TABLE agent_guardians (
    agent_id      TEXT    PRIMARY KEY NOT NULL REFERENCES agents (id),
    threshold     INTEGER NOT NULL CHECK (threshold >= 1),
    guardians     TEXT    NOT NULL,
    updated_at_ms INTEGER NOT NULL
) STRICT;

CREATE TABLE agent_recoveries (
    id            TEXT    PRIMARY KEY NOT NULL,
    agent_id      TEXT    NOT NULL REFERENCES agents (id),
    new_key       BLOB    NOT NULL,
    -- the guardian set when the recovery opened; later changes do not apply to it
    threshold     INTEGER NOT NULL,
    guardians     TEXT    NOT NULL,
    approvals     INTEGER NOT NULL DEFAULT 0,
    -- collecting → time_locked → completed, or cancelled from either open state
    state         TEXT    NOT NULL CHECK (state IN ('collecting', 'time_locked', 'completed', 'cancelled')),
    opened_by     TEXT    NOT NULL,
    opened_at_ms  INTEGER NOT NULL,
    unlocks_at_ms INTEGER,
    closed_at_ms  INTEGER
) STRICT;
-- At most one open recovery per agent.
CREATE UNIQUE INDEX agent_recoveries_open ON agent_recoveries (agent_id) WHERE state IN ('collecting', 'time_locked');

CREATE TABLE agent_recovery_approvals (
    recovery_id    TEXT    NOT NULL REFERENCES agent_recoveries (id),
    guardian_id    TEXT    NOT NULL,
    approved_at_ms INTEGER NOT NULL,
    PRIMARY KEY (recovery_id, guardian_id)
) STRICT;
