-- Only resolutions (post or void of a pending transfer) carry a pending id; the unique
-- index need not hold an entry for every other journal entry.
DROP INDEX ledger_transfers_one_resolution;
CREATE UNIQUE INDEX ledger_transfers_one_resolution ON ledger_transfers (pending_id) WHERE pending_id IS NOT NULL;
