-- A ledger batch on PostgreSQL may be computed before it takes the head lock, on the
-- state the batch before it leaves (src/ledger/postgres.rs). Under the lock it checks
-- that nothing else was written meanwhile. `seq` and `hash` move only with journal
-- entries; a batch of refusals, a dispute or a fee change leaves them as they were. So
-- the head row counts its own updates, whoever makes them: every ledger batch (of any
-- version) updates the row once, and so does a fee change.
ALTER TABLE ledger_head ADD COLUMN writes BIGINT NOT NULL DEFAULT 0;

CREATE FUNCTION ledger_head_count_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.writes := OLD.writes + 1;
    RETURN NEW;
END
$$;

CREATE TRIGGER ledger_head_writes BEFORE UPDATE ON ledger_head
    FOR EACH ROW EXECUTE FUNCTION ledger_head_count_write();
