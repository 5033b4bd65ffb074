-- From this version on, a ledger batch locks the ledger_head row first, before it reads
-- or writes any account row (0006 describes the older order). A replica of the older
-- version beside a newer one stays correct, but the two orders can deadlock; PostgreSQL
-- detects it and the ledger retries the batch.

-- Ledger batches (src/ledger/postgres.rs) rewrite each touched account row once per
-- batch. Leave room on every page so those updates stay on the page (HOT) and skip
-- the indexes; the setting applies to pages written from now on.
ALTER TABLE ledger_accounts SET (fillfactor = 70);
ALTER TABLE ledger_head SET (fillfactor = 50);

-- Only resolutions (post or void of a pending transfer) carry a pending id; the unique
-- index need not hold an entry for every other journal entry.
DROP INDEX ledger_transfers_one_resolution;
CREATE UNIQUE INDEX ledger_transfers_one_resolution ON ledger_transfers (pending_id) WHERE pending_id IS NOT NULL;
