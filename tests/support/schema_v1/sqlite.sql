-- A database as tokenbroker left it before fenced leases (schema migration 1 only), with links
-- in it, for the upgrade test in tests/sqlite_store.rs. Frozen: never edit it to match the code.
CREATE TABLE tokenbroker_schema_migrations (version INT PRIMARY KEY, applied_at BIGINT NOT NULL);
CREATE TABLE tokenbroker_links (
    realm            TEXT   NOT NULL,
    subject          TEXT   NOT NULL,
    provider         TEXT   NOT NULL,
    version          BIGINT NOT NULL,
    payload          BLOB   NOT NULL,
    state            TEXT   NOT NULL,
    relink_reason    TEXT   NULL,
    relink_since     BIGINT NULL,
    expires_at       BIGINT NULL,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    lease_holder     TEXT   NULL,
    lease_expires_at BIGINT NULL,
    -- TEXT compares with BINARY collation (memcmp of UTF-8), the order of Rust's `str`, which
    -- `scan` relies on. The key's (realm, subject) prefix also serves `list`, so that needs no
    -- index of its own.
    PRIMARY KEY (realm, subject, provider)
);
-- Sweeps: retention by last write, refresh-ahead by expiry, purge of dead links.
CREATE INDEX tokenbroker_links_updated_at ON tokenbroker_links (updated_at);
CREATE INDEX tokenbroker_links_expires_at ON tokenbroker_links (expires_at);
CREATE INDEX tokenbroker_links_relink_since ON tokenbroker_links (relink_since)
    WHERE state = 'relink_required';
-- The version counter: bumped by every write, never reset, so a key deleted and inserted again
-- gets a version it never had (the broker's guard against ABA).
CREATE TABLE tokenbroker_link_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n  BIGINT  NOT NULL
);
INSERT INTO tokenbroker_link_version (id, n) VALUES (1, 0);

INSERT INTO tokenbroker_schema_migrations (version, applied_at) VALUES (1, 1767225600000);

-- Three links: one free, one whose lease an instance of that version holds right now, one whose
-- lease that version took and never released (expired long ago).
INSERT INTO tokenbroker_links (realm, subject, provider, version, payload, state, relink_reason,
    relink_since, expires_at, created_at, updated_at, lease_holder, lease_expires_at)
VALUES
    ('acme', 'idle', 'google', 1, CAST('payload-idle' AS BLOB), 'active', NULL, NULL,
        1767229200000, 1767225600000, 1767225600000, NULL, NULL),
    ('acme', 'leased', 'google', 2, CAST('payload-leased' AS BLOB), 'active', NULL, NULL,
        1767229200000, 1767225600000, 1767225600000, 'tb-old-instance',
        CAST(unixepoch('subsec') * 1000 AS INTEGER) + 600000),
    ('acme', 'expired', 'google', 3, CAST('payload-expired' AS BLOB), 'active', NULL, NULL,
        1767229200000, 1767225600000, 1767225600000, 'tb-old-instance', 1767225600000);
UPDATE tokenbroker_link_version SET n = 3 WHERE id = 1;
