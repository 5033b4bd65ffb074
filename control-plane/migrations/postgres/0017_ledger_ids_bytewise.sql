-- Ledger ids are ASCII keys compared for equality and looked up in B-trees by every
-- batch, thousands at a time. Under the database's default collation every comparison
-- goes through the C library's locale-aware strcoll (even for C.UTF-8); with the "C"
-- collation it is a byte comparison. Ids sort the same either way.
ALTER TABLE ledger_accounts ALTER COLUMN id TYPE TEXT COLLATE "C";
ALTER TABLE ledger_transfers ALTER COLUMN id TYPE TEXT COLLATE "C";
ALTER TABLE ledger_rejections ALTER COLUMN id TYPE TEXT COLLATE "C";
ALTER TABLE ledger_escrows ALTER COLUMN id TYPE TEXT COLLATE "C";
ALTER TABLE ledger_unbondings ALTER COLUMN id TYPE TEXT COLLATE "C";
