-- Org CA keys may live in a PKCS#11 token. `key_store` says where an org CA's key is:
-- 'sealed': `key_sealed` holds it, sealed under the KEK, and `key_ref` is NULL;
-- 'pkcs11': `key_ref` holds the label of the private key on the configured token, and
-- `key_sealed` is empty (zero bytes: no key material is stored).
--
-- `key_sealed` stays NOT NULL: SQLite can only drop the constraint by rebuilding the
-- table, which needs foreign keys off (`certificates` references `org_cas`), and that
-- pragma has no effect inside the transaction every migration runs in.

ALTER TABLE org_cas ADD COLUMN key_store TEXT NOT NULL DEFAULT 'sealed'
    CHECK (key_store IN ('sealed', 'pkcs11'));
ALTER TABLE org_cas ADD COLUMN key_ref TEXT
    CHECK ((key_store = 'sealed' AND key_ref IS NULL AND length(key_sealed) > 0)
        OR (key_store = 'pkcs11' AND key_ref IS NOT NULL AND length(key_sealed) = 0));

-- No key reference may be used twice.
CREATE UNIQUE INDEX org_cas_key_ref ON org_cas (key_ref) WHERE key_ref IS NOT NULL;
