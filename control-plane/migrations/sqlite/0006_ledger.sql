-- The credits ledger (src/ledger): double-entry accounts, an append-only journal of
-- transfers with a SHA-256 hash chain, remembered failures (idempotency), escrows and
-- stake unbondings. Amounts are micro-credits (signed 64-bit, never negative); times are
-- milliseconds since the Unix epoch.

-- One row: the journal head (last sequence number and hash) and the settings. Every
-- ledger write locks it, after the account rows, so the journal has one order.
CREATE TABLE ledger_head (
    id         INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    seq        INTEGER  NOT NULL,
    hash       BLOB    NOT NULL,
    fee_bps    INTEGER  NOT NULL
);
INSERT INTO ledger_head (id, seq, hash, fee_bps) VALUES (1, 0, zeroblob(32), 0);

CREATE TABLE ledger_accounts (
    id               TEXT    PRIMARY KEY NOT NULL,
    kind             TEXT    NOT NULL,
    owner            TEXT,
    flags            INTEGER NOT NULL,
    debits_pending   INTEGER NOT NULL CHECK (debits_pending >= 0),
    debits_posted    INTEGER NOT NULL CHECK (debits_posted >= 0),
    credits_pending  INTEGER NOT NULL CHECK (credits_pending >= 0),
    credits_posted   INTEGER NOT NULL CHECK (credits_posted >= 0),
    created_at_ms    INTEGER NOT NULL
);
CREATE INDEX ledger_accounts_by_owner ON ledger_accounts (owner);
INSERT INTO ledger_accounts VALUES ('issuance', 'issuance', NULL, 0, 0, 0, 0, 0, 0);
INSERT INTO ledger_accounts VALUES ('treasury', 'treasury', NULL, 1, 0, 0, 0, 0, 0);

-- The journal: applied transfers only, immutable, in `seq` order. `hash` is
-- SHA-256(previous hash ‖ the entry's canonical bytes) (ledger::journal).
CREATE TABLE ledger_transfers (
    seq              INTEGER PRIMARY KEY NOT NULL,
    id               TEXT    NOT NULL UNIQUE,
    debit_account    TEXT    NOT NULL,
    credit_account   TEXT    NOT NULL,
    amount           INTEGER NOT NULL CHECK (amount >= 0),
    kind             TEXT    NOT NULL,
    pending_id       TEXT,
    purpose          TEXT    NOT NULL,
    flags            INTEGER NOT NULL,
    created_at_ms    INTEGER NOT NULL,
    hash             BLOB   NOT NULL
);
CREATE INDEX ledger_transfers_by_debit ON ledger_transfers (debit_account, seq);
CREATE INDEX ledger_transfers_by_credit ON ledger_transfers (credit_account, seq);
-- A pending transfer resolves (posts or voids) at most once.
CREATE UNIQUE INDEX ledger_transfers_one_resolution ON ledger_transfers (pending_id);

-- Transfers refused by the ledger, remembered under their id so that a retry gets the
-- original failure. Nothing else is written for them.
CREATE TABLE ledger_rejections (
    id               TEXT    PRIMARY KEY NOT NULL,
    debit_account    TEXT    NOT NULL,
    credit_account   TEXT    NOT NULL,
    amount           INTEGER NOT NULL,
    kind             TEXT    NOT NULL,
    pending_id       TEXT,
    purpose          TEXT    NOT NULL,
    flags            INTEGER NOT NULL,
    code             TEXT    NOT NULL,
    created_at_ms    INTEGER NOT NULL
);

-- Escrows: a pending transfer payer -> payee plus the escrow state machine.
CREATE TABLE ledger_escrows (
    id               TEXT    PRIMARY KEY NOT NULL,
    payer            TEXT    NOT NULL,
    payee            TEXT    NOT NULL,
    amount           INTEGER NOT NULL,
    state            TEXT    NOT NULL,
    on_expiry        TEXT    NOT NULL,
    expires_at_ms    INTEGER NOT NULL,
    released         INTEGER NOT NULL,
    created_at_ms    INTEGER NOT NULL,
    updated_at_ms    INTEGER NOT NULL
);
CREATE INDEX ledger_escrows_due ON ledger_escrows (state, expires_at_ms);
CREATE INDEX ledger_escrows_by_payer ON ledger_escrows (payer);
CREATE INDEX ledger_escrows_by_payee ON ledger_escrows (payee);

-- Stakes being unlocked: the amount waits in the unbonding account until it matures.
CREATE TABLE ledger_unbondings (
    id               TEXT    PRIMARY KEY NOT NULL,
    owner            TEXT    NOT NULL,
    stake_kind       TEXT    NOT NULL,
    amount           INTEGER NOT NULL,
    matures_at_ms    INTEGER NOT NULL,
    state            TEXT    NOT NULL,
    created_at_ms    INTEGER NOT NULL
);
CREATE INDEX ledger_unbondings_due ON ledger_unbondings (state, matures_at_ms);
CREATE INDEX ledger_unbondings_by_owner ON ledger_unbondings (owner);
