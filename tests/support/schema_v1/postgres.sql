-- A database as tokenbroker left it before fenced leases (schema migration 1 only), with links
-- in it, for the upgrade test in tests/postgres_store.rs. Frozen: never edit it to match the code.
CREATE TABLE tokenbroker_schema_migrations (version INT PRIMARY KEY, applied_at BIGINT NOT NULL);
CREATE TABLE tokenbroker_links (
    -- COLLATE "C": bytewise order, the order of Rust's `str`, which `scan` relies on (the
    -- database default collation may be locale-aware). The key's (realm, subject) prefix also
    -- serves `list`, so that needs no index of its own.
    realm            TEXT COLLATE "C" NOT NULL,
    subject          TEXT COLLATE "C" NOT NULL,
    provider         TEXT COLLATE "C" NOT NULL,
    version          BIGINT NOT NULL,
    payload          BYTEA  NOT NULL,
    state            TEXT   NOT NULL,
    relink_reason    TEXT   NULL,
    relink_since     BIGINT NULL,
    expires_at       BIGINT NULL,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    lease_holder     TEXT   NULL,
    lease_expires_at BIGINT NULL,
    PRIMARY KEY (realm, subject, provider)
);
-- Sweeps: retention by last write, refresh-ahead by expiry, purge of dead links.
CREATE INDEX tokenbroker_links_updated_at ON tokenbroker_links (updated_at);
CREATE INDEX tokenbroker_links_expires_at ON tokenbroker_links (expires_at);
CREATE INDEX tokenbroker_links_relink_since ON tokenbroker_links (relink_since)
    WHERE state = 'relink_required';
-- Versions for every write, never reset, so a key deleted and inserted again gets a version it
-- never had (the broker's guard against ABA). Gaps are fine.
CREATE SEQUENCE tokenbroker_link_version AS BIGINT START 1;

INSERT INTO tokenbroker_schema_migrations (version, applied_at) VALUES (1, 1767225600000);

-- Three links: one free, one whose lease an instance of that version holds right now, one whose
-- lease that version took and never released (expired long ago).
INSERT INTO tokenbroker_links (realm, subject, provider, version, payload, state, relink_reason,
    relink_since, expires_at, created_at, updated_at, lease_holder, lease_expires_at)
VALUES
    ('acme', 'idle', 'google', 1, convert_to('payload-idle', 'UTF8'), 'active', NULL, NULL,
        1767229200000, 1767225600000, 1767225600000, NULL, NULL),
    ('acme', 'leased', 'google', 2, convert_to('payload-leased', 'UTF8'), 'active', NULL, NULL,
        1767229200000, 1767225600000, 1767225600000, 'tb-old-instance',
        (extract(epoch from clock_timestamp()) * 1000)::bigint + 600000),
    ('acme', 'expired', 'google', 3, convert_to('payload-expired', 'UTF8'), 'active', NULL, NULL,
        1767229200000, 1767225600000, 1767225600000, 'tb-old-instance', 1767225600000);
SELECT setval('tokenbroker_link_version', 3);
