-- An account's journal entries are linked newest to oldest instead of indexed: the
-- account row names its newest entry (last_seq) and every entry names the previous
-- entry of its debit account (debit_prev) and of its credit account (credit_prev);
-- 0 means none. A history page follows the links by primary key, and a ledger batch
-- no longer pays two random insertions into per-account indexes for every entry, which
-- were most of the cost of writing the journal (BENCHMARKS.md, "Credits ledger").

ALTER TABLE ledger_accounts ADD COLUMN last_seq BIGINT NOT NULL DEFAULT 0 CHECK (last_seq >= 0);
ALTER TABLE ledger_transfers ADD COLUMN debit_prev BIGINT NOT NULL DEFAULT 0 CHECK (debit_prev >= 0);
ALTER TABLE ledger_transfers ADD COLUMN credit_prev BIGINT NOT NULL DEFAULT 0 CHECK (credit_prev >= 0);

-- Links for the entries written before this version (the indexes still serve here).
CREATE TEMPORARY TABLE ledger_links AS
SELECT seq, side, COALESCE(LAG(seq) OVER (PARTITION BY account ORDER BY seq), 0) AS previous
FROM (
    SELECT seq, debit_account AS account, 'd' AS side FROM ledger_transfers
    UNION ALL
    SELECT seq, credit_account AS account, 'c' AS side FROM ledger_transfers
) AS postings;
UPDATE ledger_transfers AS t SET debit_prev = l.previous FROM ledger_links AS l WHERE l.seq = t.seq AND l.side = 'd';
UPDATE ledger_transfers AS t SET credit_prev = l.previous FROM ledger_links AS l WHERE l.seq = t.seq AND l.side = 'c';
UPDATE ledger_accounts AS a SET last_seq = n.newest
FROM (
    SELECT account, MAX(seq) AS newest FROM (
        SELECT seq, debit_account AS account FROM ledger_transfers
        UNION ALL
        SELECT seq, credit_account AS account FROM ledger_transfers
    ) AS postings GROUP BY account
) AS n WHERE n.account = a.id;
DROP TABLE ledger_links;

DROP INDEX ledger_transfers_by_debit;
DROP INDEX ledger_transfers_by_credit;
