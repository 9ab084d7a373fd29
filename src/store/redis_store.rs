//! [`RedisStore`]: links in Redis, shared by every instance of a deployment.
//!
//! # Why the `redis` crate
//!
//! It is the maintained, widely used client (redis-rs), with a tokio
//! [`ConnectionManager`] that multiplexes one connection for
//! every task and reconnects on its own after the server went away, and with
//! [`redis::Script`], which runs a Lua script by `EVALSHA` and loads it on `NOSCRIPT`. `fred` has
//! more built in (pools, Sentinel and Cluster clients in one crate), but every decision here is
//! one short script on one connection, so that buys nothing but a larger dependency tree and a
//! second client model for hosts that already use redis-rs.
//!
//! # Data model
//!
//! With the default prefix `tokenbroker` (see [`RedisStore::with_prefix`]):
//!
//! | key | type | what |
//! |---|---|---|
//! | `{tokenbroker}:link:{realm}:{subject}:{provider}` | hash | one link: `version`, `payload` (binary), `state`, `relink_reason`, `relink_since`, `expires_at`, `created_at`, `updated_at` (unix milliseconds), `lease_holder`, `lease_token`, `lease_expires_at` |
//! | `{tokenbroker}:version` | string | the counter of versions (`INCR`), never reset, so a key deleted and inserted again never gets a version it had |
//! | `{tokenbroker}:subject:{realm}:{subject}` | set | the providers of one subject's links, for `list` |
//! | `{tokenbroker}:scan` | sorted set | every link, all scores 0, members `realm NUL subject NUL provider`, for `scan` |
//! | `{tokenbroker}:revocation:{id}` | hash | one owed revocation (the outbox): `realm`, `subject`, `provider`, `payload` (binary), `attempts`, `due_at`, `created_at` |
//! | `{tokenbroker}:revocations` | sorted set | the outbox's ids scored by `due_at` (unix milliseconds), for the claim |
//!
//! Key parts are percent-encoded (`%`, `:`, `{`, `}`), so no realm or subject can make two links
//! share a key or open a hash tag of its own. Scan members are the raw parts joined by a NUL
//! byte, which no identifier may hold (control characters are rejected), so `ZRANGEBYLEX`, which
//! compares bytes, walks them in [`TokenKey`] order (realm, then subject, then provider, each as
//! bytes): the contract of [`TokenStore::scan`].
//!
//! Every decision is one Lua script, which Redis runs atomically: insert (and both indexes),
//! compare-and-swap (version and fencing token checked together), versioned delete (and both
//! indexes), and the lease scripts, which judge expiry by Redis' own clock (`TIME` inside the
//! script), so instances with skewed clocks never refresh the same link at once. Release and
//! extension compare the lease's fencing token, never the holder id.
//!
//! # Running Redis for it
//!
//! - **Change notices.** Every script that changes a link also `PUBLISH`es the link's scan
//!   member on `{prefix}:changes`, in the script, atomically with the change; that is what
//!   [`RedisStore::change_feed`] subscribes to for a
//!   [`CachedStore`](crate::store::CachedStore). With Redis ACLs the store's user needs
//!   permission to publish there (`&{prefix}:changes`, or `allchannels`), or every write fails
//!   (ACL users made on Redis 7 have no channel by default). Instances of versions before
//!   0.2.0 do not publish: turn a feed on once every instance writes with this version.
//! - **No expiry, no eviction.** Records carry no TTL: a link must not vanish because Redis
//!   ran short of memory. Run the server with `maxmemory-policy noeviction` (the default), so
//!   a full Redis refuses writes (a [`StoreError::Backend`]) instead of dropping links.
//! - **Persistence** is the server's business: without AOF (`appendonly yes`) or snapshots, a
//!   restart loses every link and users must link their accounts again.
//! - **Redis Cluster.** All of one store's keys share the hash tag `{prefix}`, so they live in
//!   one slot: the scripts touch the link, the indexes and the version counter together, and a
//!   script may only touch keys of one slot. One store is therefore served by one shard (its
//!   primary and replicas); it does not spread over the cluster. To spread load, give groups of
//!   realms stores of their own prefix. This store talks to one node through a
//!   `ConnectionManager`; it does not follow `MOVED` redirections.
//! - **Sentinel fail-over, replication.** Replication is asynchronous, and so is what a
//!   fail-over keeps. A lease may be lost: the promoted replica may not have it, another
//!   instance takes it and refreshes too. The fencing token and the versioned compare-and-swap
//!   still stop the stale writer: its write is checked against the version and lease token the
//!   *new* primary holds, so it cannot overwrite a newer record, and the engine re-reads on the
//!   conflict and serves the winner's tokens. The engine then guarantees at worst a second
//!   refresh of the link (at a provider that rotates refresh tokens and rejects reuse, the
//!   second one can revoke the grant, and the user links again), never a newer record replaced
//!   by an older one. What no check can keep is a write that the old primary acknowledged and
//!   had not yet replicated: it is gone, and if it held a rotated refresh token the link needs a
//!   re-link. Where that matters, narrow the window with `min-replicas-to-write` and
//!   `min-replicas-max-lag` on the primary (it then refuses writes while too few replicas keep
//!   up; the engine retries them), or use PostgreSQL with synchronous replication.
//!   Reconnecting to the new primary is the host's part: point the URL at a name that follows
//!   the primary, or build the `ConnectionManager` yourself
//!   ([`RedisStore::from_manager`]).
//!
//! [`TokenKey`]: crate::TokenKey

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, RedisError, Script};
use async_trait::async_trait;
use time::OffsetDateTime;

use super::{
    ChangeFeed, FeedEvent, Lease, LeaseAttempt, LeaseHolder, LeaseToken, LinkState,
    PendingRevocation, Record, RecordMeta, RevocationId, ScanCursor, ScanPage, ScannedLink,
    StoreError, StoredRecord, TokenStore, Version,
};
use crate::ids::{ProviderId, Realm, Subject, TokenKey};
use crate::token::Payload;

const STORE: &str = "redis";

/// The prefix of every key when none is set.
pub const DEFAULT_PREFIX: &str = "tokenbroker";

/// The metadata fields, in the order every read asks for them (`HMGET`).
const META_FIELDS: [&str; 7] = [
    "version",
    "state",
    "relink_reason",
    "relink_since",
    "expires_at",
    "created_at",
    "updated_at",
];

/// Writes the record fields of a compare-and-swap or insert: `ARGV[first]` .. `ARGV[first+7]`
/// are payload, state, relink_reason, relink_since, expires_at, created_at, updated_at. An
/// optional value is sent as `=value`, an absent one as the empty string (and its field is
/// deleted), so an empty relink reason is still told apart from none.
const WRITE_FIELDS: &str = r#"
local function write_fields(key, v, first)
  redis.call('HSET', key, 'version', v, 'payload', ARGV[first], 'state', ARGV[first + 1],
    'created_at', ARGV[first + 5], 'updated_at', ARGV[first + 6])
  local optional = { 'relink_reason', 'relink_since', 'expires_at' }
  for i, field in ipairs(optional) do
    local a = ARGV[first + 1 + i]
    if string.sub(a, 1, 1) == '=' then
      redis.call('HSET', key, field, string.sub(a, 2))
    else
      redis.call('HDEL', key, field)
    end
  end
end
"#;

/// The server's clock in unix milliseconds.
const NOW_MS: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"#;

struct Scripts {
    insert: Script,
    swap: Script,
    delete: Script,
    try_lease: Script,
    release: Script,
    extend: Script,
    delete_enqueue: Script,
    enqueue: Script,
    claim: Script,
    reschedule: Script,
    remove: Script,
}

/// Writes an outbox entry: `KEYS[hash]`, `KEYS[queue]`, and `ARGV[first]` .. `ARGV[first+7]`
/// = id, realm, subject, provider, payload, attempts, due_at, created_at.
const WRITE_REVOCATION: &str = r#"
local function write_revocation(hash, queue, first)
  redis.call('HSET', hash, 'realm', ARGV[first + 1], 'subject', ARGV[first + 2],
    'provider', ARGV[first + 3], 'payload', ARGV[first + 4], 'attempts', ARGV[first + 5],
    'due_at', ARGV[first + 6], 'created_at', ARGV[first + 7])
  redis.call('ZADD', queue, ARGV[first + 6], ARGV[first])
end
"#;

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    Scripts {
    // KEYS: link, counter, subject index, scan index. ARGV: provider, scan member, fields (3..9),
    // changes channel (10). Every script that changes a link publishes its scan member on the
    // changes channel, in the script, so the notice is atomic with the change.
    insert: Script::new(&format!(
        "{WRITE_FIELDS}
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local v = redis.call('INCR', KEYS[2])
write_fields(KEYS[1], v, 3)
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], 0, ARGV[2])
redis.call('PUBLISH', ARGV[10], ARGV[2])
return v"
    )),
    // KEYS: link, counter. ARGV: expected version, fence (`=token` or empty), fields (3..9),
    // changes channel (10), scan member (11).
    // The lease fields are left alone: a write does not need the lease and must not free or
    // steal one a refresh is holding. Expiry is not looked at: a lease that ran out but was
    // not taken over is still current (the trait's contract).
    swap: Script::new(&format!(
        "{WRITE_FIELDS}
local cur = redis.call('HGET', KEYS[1], 'version')
if (not cur) or cur ~= ARGV[1] then return false end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'lease_token') ~= string.sub(ARGV[2], 2) then
  return false
end
local v = redis.call('INCR', KEYS[2])
write_fields(KEYS[1], v, 3)
redis.call('PUBLISH', ARGV[10], ARGV[11])
return v"
    )),
    // KEYS: link, subject index, scan index. ARGV: expected version (empty: any), provider,
    // scan member, changes channel. 1: deleted, 0: missing, -1: another version. The lease goes
    // with the hash.
    delete: Script::new(
        "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return 1",
    ),
    // KEYS: link. ARGV: holder, ttl in ms, token. {0}: missing, {1}: busy, {2, until}: taken.
    // Free when nobody holds it or it expired by Redis' clock; a holder without an expiry
    // (never written by us) keeps it, as the SQL stores do.
    try_lease: Script::new(&format!(
        "{NOW_MS}
if redis.call('EXISTS', KEYS[1]) == 0 then return {{0}} end
local now = now_ms()
local holder = redis.call('HGET', KEYS[1], 'lease_holder')
if holder then
  local exp = tonumber(redis.call('HGET', KEYS[1], 'lease_expires_at'))
  if (not exp) or exp > now then return {{1}} end
end
local until_ms = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'lease_holder', ARGV[1], 'lease_token', ARGV[3],
  'lease_expires_at', until_ms)
return {{2, until_ms}}"
    )),
    // KEYS: link. ARGV: token. Only the current token frees the lease.
    release: Script::new(
        "if redis.call('HGET', KEYS[1], 'lease_token') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'lease_holder', 'lease_token', 'lease_expires_at')
  return 1
end
return 0",
    ),
    // KEYS: link. ARGV: token, ttl in ms. The new expiry, or nil for a stale token.
    extend: Script::new(&format!(
        "{NOW_MS}
if redis.call('HGET', KEYS[1], 'lease_token') ~= ARGV[1] then return false end
local until_ms = now_ms() + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'lease_expires_at', until_ms)
return until_ms"
    )),
    // KEYS: link, subject index, scan index, entry hash, queue. ARGV: expected version (empty:
    // any), provider, scan member, the entry (4..11), changes channel (12). As `delete`, and
    // the entry is written in the same script exactly when the link was deleted.
    delete_enqueue: Script::new(&format!(
        "{WRITE_REVOCATION}
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[3])
write_revocation(KEYS[4], KEYS[5], 4)
redis.call('PUBLISH', ARGV[12], ARGV[3])
return 1"
    )),
    // KEYS: entry hash, queue. ARGV: the entry (1..8).
    enqueue: Script::new(&format!(
        "{WRITE_REVOCATION}
write_revocation(KEYS[1], KEYS[2], 1)
return 1"
    )),
    // KEYS: queue. ARGV: now, until (unix ms), limit, the entries' key prefix. The queue is
    // scored by `due_at`; each claimed entry moves to `until`. Entry hashes share the queue's
    // hash tag, so they live in its slot. Returns {id, realm, subject, provider, payload,
    // attempts, due_at, created_at} per entry.
    claim: Script::new(
        "local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local h = ARGV[4] .. id
  if redis.call('EXISTS', h) == 1 then
    local attempts = redis.call('HINCRBY', h, 'attempts', 1)
    redis.call('HSET', h, 'due_at', ARGV[2])
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    local f = redis.call('HMGET', h, 'realm', 'subject', 'provider', 'payload', 'created_at')
    out[#out + 1] = {id, f[1], f[2], f[3], f[4], tostring(attempts), ARGV[2], f[5]}
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out",
    ),
    // KEYS: entry hash, queue. ARGV: claimed attempts, due_at, id. 1 when it was still ours.
    reschedule: Script::new(
        "if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'due_at', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1",
    ),
    // KEYS: entry hash, queue. ARGV: id.
    remove: Script::new(
        "redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1",
    ),
}
});

/// A [`TokenStore`] in Redis (feature `redis`), for deployments of several instances.
///
/// One hash per link, a counter for versions, and two indexes (see the [module
/// docs](crate::store::redis_store) for the layout and for what it promises under Cluster and
/// Sentinel); every decision is one Lua script, run by `EVALSHA`. Leases are judged by Redis'
/// clock. Times in [`RecordMeta`] are kept to the millisecond.
///
/// Run the server with `maxmemory-policy noeviction` (the default): records carry no TTL, and
/// a link must never be evicted.
///
/// `Debug` shows where the store connects and its prefix, never the URL's password.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use tokenbroker::{RedisStore, TokenStore};
///
/// let store = RedisStore::connect("redis://:secret@redis.internal:6379/0")
///     .await?
///     .with_prefix("myapp-tokens");
/// let store: Arc<dyn TokenStore> = Arc::new(store);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    /// For connections of its own (the change feed's pub/sub); `None` for a host's manager
    /// until [`with_client`](RedisStore::with_client).
    client: Option<Client>,
    /// Where it connects (`host:port/db`), without credentials; `None` for a host's manager.
    endpoint: Option<Arc<str>>,
    prefix: Arc<str>,
    /// `{prefix}`: the hash tag every key starts with.
    tag: Arc<str>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field(
                "endpoint",
                &self.endpoint.as_deref().unwrap_or("(host's connection)"),
            )
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn backend(e: RedisError) -> StoreError {
    StoreError::backend(STORE, e)
}

impl RedisStore {
    /// Connects to `url` (`redis://[:password@]host:port[/db]`, or `redis+unix:///path`) through
    /// a [`ConnectionManager`] that reconnects by itself, with the default prefix
    /// [`DEFAULT_PREFIX`]. Fails if the first connection cannot be made. Errors never repeat the
    /// URL.
    ///
    /// Each command waits up to 5 s for its answer; a command that times out or meets a dropped
    /// connection fails with [`StoreError::Backend`] (its outcome unknown), and the manager
    /// reconnects in the background for the next one.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tokenbroker::StoreError> {
    /// let store = tokenbroker::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = Client::open(url).map_err(backend)?;
        let info = client.get_connection_info();
        let endpoint = format!("{}/{}", info.addr(), info.redis_settings().db());
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(backend)?;
        let mut store = RedisStore::from_manager(conn);
        store.endpoint = Some(endpoint.into());
        store.client = Some(client);
        Ok(store)
    }

    /// Uses a connection manager the host configured (its time-outs, retries, credentials),
    /// with the default prefix [`DEFAULT_PREFIX`].
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use tokenbroker::store::redis::{Client, aio::ConnectionManager};
    ///
    /// let client = Client::open("redis://127.0.0.1:6379")?;
    /// let manager = ConnectionManager::new(client).await?;
    /// let store = tokenbroker::RedisStore::from_manager(manager);
    /// # Ok(()) }
    /// ```
    pub fn from_manager(conn: ConnectionManager) -> Self {
        RedisStore {
            conn,
            client: None,
            endpoint: None,
            prefix: DEFAULT_PREFIX.into(),
            tag: format!("{{{}}}", encode(DEFAULT_PREFIX)).into(),
        }
    }

    /// Keeps this store's keys under `prefix` instead of [`DEFAULT_PREFIX`], so that several
    /// stores (deployments, tests, groups of realms) share one Redis without seeing each
    /// other. Any text will do: it is encoded into the keys' hash tag `{prefix}`.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tokenbroker::StoreError> {
    /// let store = tokenbroker::RedisStore::connect("redis://127.0.0.1:6379")
    ///     .await?
    ///     .with_prefix("staging");
    /// assert_eq!(store.prefix(), "staging");
    /// # Ok(()) }
    /// ```
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix: String = prefix.into();
        self.tag = format!("{{{}}}", encode(&prefix)).into();
        self.prefix = prefix.into();
        self
    }

    /// Gives a store built by [`from_manager`](Self::from_manager) the [`Client`] its change
    /// feed opens its own connection with (a pub/sub connection cannot be shared with the
    /// manager's). A store built by [`connect`](Self::connect) has one already.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use tokenbroker::store::redis::{Client, aio::ConnectionManager};
    ///
    /// let client = Client::open("redis://127.0.0.1:6379")?;
    /// let manager = ConnectionManager::new(client.clone()).await?;
    /// let store = tokenbroker::RedisStore::from_manager(manager).with_client(client);
    /// let feed = store.change_feed()?;
    /// # drop(feed);
    /// # Ok(()) }
    /// ```
    pub fn with_client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// A [`ChangeFeed`] of this store's links, for
    /// [`CachedStore::with_change_feed`](crate::store::CachedStore::with_change_feed).
    ///
    /// Every script that changes a link (insert, compare-and-swap, delete, delete with a
    /// revocation) publishes the link's scan member on `{prefix}:changes` inside the script,
    /// atomically with the change; the feed subscribes to that channel on a connection of its
    /// own. When the connection drops it reports [`FeedEvent::Lost`], reconnects with a backoff
    /// (100 ms doubling to 10 s), subscribes again and reports [`FeedEvent::Subscribed`].
    ///
    /// A store built by [`from_manager`](Self::from_manager) needs
    /// [`with_client`](Self::with_client) first; without a client this is a
    /// [`StoreError::Backend`].
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tokenbroker::StoreError> {
    /// use tokenbroker::RedisStore;
    /// use tokenbroker::store::CachedStore;
    ///
    /// let redis = RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// let feed = redis.change_feed()?;
    /// let store = CachedStore::with_change_feed(redis, feed);
    /// # Ok(()) }
    /// ```
    pub fn change_feed(&self) -> Result<RedisChangeFeed, StoreError> {
        let Some(client) = self.client.clone() else {
            return Err(StoreError::backend(
                STORE,
                std::io::Error::other(
                    "RedisStore::change_feed needs a client: call with_client on a store built by from_manager",
                ),
            ));
        };
        Ok(RedisChangeFeed {
            client,
            channel: self.changes_channel(),
            subscription: None,
            pause: None,
        })
    }

    /// The prefix of this store's keys.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tokenbroker::StoreError> {
    /// let store = tokenbroker::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// assert_eq!(store.prefix(), tokenbroker::store::redis_store::DEFAULT_PREFIX);
    /// # Ok(()) }
    /// ```
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn link_key(&self, key: &TokenKey) -> String {
        format!(
            "{}:link:{}:{}:{}",
            self.tag,
            encode(key.realm.as_str()),
            encode(key.subject.as_str()),
            encode(key.provider.as_str())
        )
    }

    fn subject_key(&self, realm: &Realm, subject: &Subject) -> String {
        format!(
            "{}:subject:{}:{}",
            self.tag,
            encode(realm.as_str()),
            encode(subject.as_str())
        )
    }

    /// The pub/sub channel every change of a link is published on: `{prefix}:changes`.
    fn changes_channel(&self) -> String {
        format!("{}:changes", self.tag)
    }

    fn counter_key(&self) -> String {
        format!("{}:version", self.tag)
    }

    fn scan_key(&self) -> String {
        format!("{}:scan", self.tag)
    }

    /// The prefix of outbox entries' keys; an entry's key is the prefix and its id.
    fn revocation_prefix(&self) -> String {
        format!("{}:revocation:", self.tag)
    }

    fn revocation_key(&self, id: &RevocationId) -> String {
        format!("{}{}", self.revocation_prefix(), id.as_str())
    }

    fn revocation_queue_key(&self) -> String {
        format!("{}:revocations", self.tag)
    }

    /// Runs a script with `EVALSHA`, loading it when the server does not have it (after a
    /// restart or `SCRIPT FLUSH`).
    async fn run<T: ::redis::FromRedisValue>(
        &self,
        invocation: &::redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        invocation.invoke_async(&mut conn).await.map_err(backend)
    }
}

/// The change feed of a [`RedisStore`] (see [`RedisStore::change_feed`]).
pub struct RedisChangeFeed {
    client: Client,
    channel: String,
    /// The subscribed connection: its sink (kept, so that the connection stays subscribed)
    /// and its messages.
    subscription: Option<(::redis::aio::PubSubSink, ::redis::aio::PubSubStream)>,
    /// The pause before the next connection attempt, after a failure.
    pause: Option<Duration>,
}

impl fmt::Debug for RedisChangeFeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisChangeFeed")
            .field("channel", &self.channel)
            .field("connected", &self.subscription.is_some())
            .finish_non_exhaustive()
    }
}

impl RedisChangeFeed {
    async fn subscribe(&mut self) -> Result<(), RedisError> {
        let limit = Duration::from_secs(5);
        let timed_out = || RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        let mut pubsub = tokio::time::timeout(limit, self.client.get_async_pubsub())
            .await
            .map_err(|_| timed_out())??;
        tokio::time::timeout(limit, pubsub.subscribe(&self.channel))
            .await
            .map_err(|_| timed_out())??;
        self.subscription = Some(pubsub.split());
        Ok(())
    }
}

#[async_trait]
impl ChangeFeed for RedisChangeFeed {
    async fn next_event(&mut self) -> Option<FeedEvent> {
        use futures_util::StreamExt;
        loop {
            let Some((_, messages)) = self.subscription.as_mut() else {
                if let Some(pause) = self.pause {
                    tokio::time::sleep(pause).await;
                }
                match self.subscribe().await {
                    Ok(()) => {
                        self.pause = None;
                        return Some(FeedEvent::Subscribed);
                    }
                    Err(e) => {
                        let pause = self.pause.map_or(Duration::from_millis(100), |p| {
                            (p * 2).min(Duration::from_secs(10))
                        });
                        self.pause = Some(pause);
                        tracing::warn!(target: "tokenbroker", error = %e, retry_in = ?pause, "cache change feed: cannot subscribe");
                        continue;
                    }
                }
            };
            match messages.next().await {
                Some(message) => {
                    return Some(match key_of_member(message.get_payload_bytes()) {
                        Ok(key) => FeedEvent::Changed(key),
                        Err(_) => FeedEvent::ChangedAll,
                    });
                }
                None => {
                    self.subscription = None;
                    self.pause = Some(Duration::from_millis(100));
                    tracing::warn!(target: "tokenbroker", "cache change feed: connection lost");
                    return Some(FeedEvent::Lost);
                }
            }
        }
    }
}

/// Percent-encodes the bytes that would change a key's structure: the separator `:`, the hash
/// tag braces and `%` itself.
fn encode(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for c in part.chars() {
        match c {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            c => out.push(c),
        }
    }
    out
}

/// The scan index member of a key: its parts joined by NUL, which no identifier holds, so byte
/// order of members is the key order.
/// A version as the scripts compare it. Versions this store hands out are numbers; any other
/// (a tag) becomes a string no counter equals, so it matches no link.
fn version_arg(version: &Version) -> String {
    match version.number() {
        Some(n) => n.to_string(),
        None => "-".to_owned(),
    }
}

fn scan_member(key: &TokenKey) -> Vec<u8> {
    let mut m = Vec::with_capacity(
        key.realm.as_str().len() + key.subject.as_str().len() + key.provider.as_str().len() + 2,
    );
    m.extend_from_slice(key.realm.as_str().as_bytes());
    m.push(0);
    m.extend_from_slice(key.subject.as_str().as_bytes());
    m.push(0);
    m.extend_from_slice(key.provider.as_str().as_bytes());
    m
}

fn key_of_member(member: &[u8]) -> Result<TokenKey, StoreError> {
    let text = String::from_utf8_lossy(member);
    let mut parts = text.split('\0');
    let (Some(realm), Some(subject), Some(provider), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid_key(
            "scan index member is not realm, subject, provider",
        ));
    };
    TokenKey::parse(realm, subject, provider)
        .map_err(|e| invalid_key(&format!("scan index member does not parse: {e}")))
}

fn invalid_key(reason: &str) -> StoreError {
    let marker = "(invalid)";
    StoreError::Corrupt {
        key: TokenKey::new(
            Realm::new(marker).expect("valid realm"),
            Subject::new(marker).expect("valid subject"),
            ProviderId::new("invalid").expect("valid provider"),
        ),
        reason: reason.to_owned(),
        version: None,
    }
}

/// A duration in whole milliseconds, rounded up so that a short but non-zero TTL never becomes
/// an already-expired lease, and clamped to about 100 years.
fn duration_ms(d: Duration) -> i64 {
    const MAX_MS: i64 = 100 * 366 * 24 * 3600 * 1000;
    let ms = d.as_nanos().div_ceil(1_000_000);
    i64::try_from(ms).map_or(MAX_MS, |ms| ms.min(MAX_MS))
}

fn to_ms(t: OffsetDateTime) -> i64 {
    // Every `OffsetDateTime` (years ±9999) fits in i64 milliseconds.
    (t.unix_timestamp_nanos().div_euclid(1_000_000)) as i64
}

fn from_ms(ms: i64, field: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|_| format!("field {field} holds an out-of-range time ({ms})"))
}

/// Adds the record fields (`ARGV` from the third on) to a script invocation.
fn push_fields(inv: &mut ::redis::ScriptInvocation<'_>, record: &Record) {
    let meta = &record.meta;
    let (reason, since) = match &meta.state {
        LinkState::Active => (None, None),
        LinkState::RelinkRequired { reason, since } => (Some(reason.as_str()), Some(to_ms(*since))),
    };
    let opt = |v: Option<String>| v.map_or_else(String::new, |v| format!("={v}"));
    inv.arg(record.payload.expose_secret())
        .arg(meta.state.name())
        .arg(opt(reason.map(str::to_owned)))
        .arg(opt(since.map(|s| s.to_string())))
        .arg(opt(meta.expires_at.map(|t| to_ms(t).to_string())))
        .arg(to_ms(meta.created_at))
        .arg(to_ms(meta.updated_at));
}

/// The [`META_FIELDS`] of one hash as read, `None` when the hash does not exist.
fn parse_meta(
    key: &TokenKey,
    fields: Vec<Option<Vec<u8>>>,
) -> Result<Option<(RecordMeta, Version)>, StoreError> {
    if fields.iter().all(Option::is_none) {
        return Ok(None);
    }
    let text = |i: usize| -> Option<String> {
        fields
            .get(i)
            .and_then(|f| f.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let int = |i: usize| -> Result<Option<i64>, String> {
        text(i)
            .map(|t| {
                t.parse::<i64>()
                    .map_err(|_| format!("field {} is not an integer", META_FIELDS[i]))
            })
            .transpose()
    };
    let corrupt = |version: Option<Version>| {
        move |reason: String| StoreError::Corrupt {
            key: key.clone(),
            reason,
            version: version.clone(),
        }
    };
    let version = match int(0).map_err(corrupt(None))? {
        Some(n) if n > 0 => Version::from_number(n as u64),
        other => {
            return Err(corrupt(None)(format!("field version holds {other:?}")));
        }
    };
    let corrupt = corrupt(Some(version.clone()));
    let state = match (text(1).as_deref(), text(2), int(3).map_err(&corrupt)?) {
        (Some("active"), _, _) => LinkState::Active,
        (Some("relink_required"), Some(reason), Some(since)) => LinkState::RelinkRequired {
            reason,
            since: from_ms(since, "relink_since").map_err(&corrupt)?,
        },
        (Some("relink_required"), _, _) => {
            return Err(corrupt(
                "state relink_required without relink_reason and relink_since".into(),
            ));
        }
        (other, _, _) => {
            let shown: Option<String> = other.map(|o| o.chars().take(32).collect());
            return Err(corrupt(format!("unknown state {shown:?}")));
        }
    };
    let expires_at = int(4)
        .map_err(&corrupt)?
        .map(|ms| from_ms(ms, "expires_at"))
        .transpose()
        .map_err(&corrupt)?;
    let created_at = int(5)
        .map_err(&corrupt)?
        .ok_or_else(|| "field created_at is missing".to_owned())
        .and_then(|ms| from_ms(ms, "created_at"))
        .map_err(&corrupt)?;
    let updated_at = int(6)
        .map_err(&corrupt)?
        .ok_or_else(|| "field updated_at is missing".to_owned())
        .and_then(|ms| from_ms(ms, "updated_at"))
        .map_err(&corrupt)?;
    Ok(Some((
        RecordMeta::new(state, expires_at, created_at, updated_at),
        version,
    )))
}

fn lease_until(key: &TokenKey, ms: i64) -> Result<OffsetDateTime, StoreError> {
    from_ms(ms, "lease_expires_at").map_err(|reason| StoreError::Corrupt {
        key: key.clone(),
        reason,
        version: None,
    })
}

#[async_trait]
impl TokenStore for RedisStore {
    async fn load(&self, key: &TokenKey) -> Result<Option<StoredRecord>, StoreError> {
        let mut conn = self.conn.clone();
        // One HMGET: the fields come from one moment.
        let mut fields: Vec<Option<Vec<u8>>> = ::redis::cmd("HMGET")
            .arg(self.link_key(key))
            .arg(&META_FIELDS[..])
            .arg("payload")
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        let payload = fields.pop().flatten();
        let Some((meta, version)) = parse_meta(key, fields)? else {
            return Ok(None);
        };
        let Some(payload) = payload else {
            return Err(StoreError::Corrupt {
                key: key.clone(),
                reason: "field payload is missing".into(),
                version: Some(version),
            });
        };
        Ok(Some(StoredRecord::new(
            Record::new(Payload::new(payload), meta),
            version,
        )))
    }

    async fn insert(&self, key: &TokenKey, record: &Record) -> Result<Version, StoreError> {
        let mut inv = SCRIPTS.insert.prepare_invoke();
        inv.key(self.link_key(key))
            .key(self.counter_key())
            .key(self.subject_key(&key.realm, &key.subject))
            .key(self.scan_key())
            .arg(key.provider.as_str())
            .arg(scan_member(key));
        push_fields(&mut inv, record);
        inv.arg(self.changes_channel());
        let version: Option<i64> = self.run(&inv).await?;
        version_of(key, version)
    }

    async fn compare_and_swap(
        &self,
        key: &TokenKey,
        expected: Version,
        record: &Record,
        fence: Option<&LeaseToken>,
    ) -> Result<Version, StoreError> {
        let mut inv = SCRIPTS.swap.prepare_invoke();
        inv.key(self.link_key(key))
            .key(self.counter_key())
            .arg(version_arg(&expected))
            .arg(fence.map_or_else(String::new, |f| format!("={}", f.as_str())));
        push_fields(&mut inv, record);
        inv.arg(self.changes_channel()).arg(scan_member(key));
        let version: Option<i64> = self.run(&inv).await?;
        version_of(key, version)
    }

    async fn delete(&self, key: &TokenKey, expected: Option<Version>) -> Result<bool, StoreError> {
        let mut inv = SCRIPTS.delete.prepare_invoke();
        inv.key(self.link_key(key))
            .key(self.subject_key(&key.realm, &key.subject))
            .key(self.scan_key())
            .arg(expected.as_ref().map_or_else(String::new, version_arg))
            .arg(key.provider.as_str())
            .arg(scan_member(key))
            .arg(self.changes_channel());
        match self.run::<i64>(&inv).await? {
            1 => Ok(true),
            0 => Ok(false),
            _ => Err(StoreError::Conflict { key: key.clone() }),
        }
    }

    async fn list(&self, realm: &Realm, subject: &Subject) -> Result<Vec<TokenKey>, StoreError> {
        let mut conn = self.conn.clone();
        let providers: Vec<Vec<u8>> = ::redis::cmd("SMEMBERS")
            .arg(self.subject_key(realm, subject))
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        let mut keys = providers
            .iter()
            .map(|p| {
                let p = String::from_utf8_lossy(p);
                ProviderId::new(&*p)
                    .map(|p| TokenKey::new(realm.clone(), subject.clone(), p))
                    .map_err(|e| invalid_key(&format!("subject index member does not parse: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        keys.sort_unstable();
        Ok(keys)
    }

    async fn scan(
        &self,
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage, StoreError> {
        let after = cursor.map(ScanCursor::key).transpose()?;
        let limit = limit.max(1);
        let mut conn = self.conn.clone();
        // `(` makes the bound exclusive: strictly after the cursor.
        let min = match &after {
            None => b"-".to_vec(),
            Some(a) => {
                let mut m = vec![b'('];
                m.extend(scan_member(a));
                m
            }
        };
        // One member more than asked for tells whether the walk goes on.
        let mut members: Vec<Vec<u8>> = ::redis::cmd("ZRANGEBYLEX")
            .arg(self.scan_key())
            .arg(min)
            .arg("+")
            .arg("LIMIT")
            .arg(0)
            .arg(i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX))
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        let more = members.len() > limit;
        members.truncate(limit);
        let keys = members
            .iter()
            .map(|m| key_of_member(m))
            .collect::<Result<Vec<_>, _>>()?;
        // The cursor follows the index, not the links read below: a link deleted between the
        // two reads leaves the page short, not the walk.
        let next = if more {
            keys.last().map(ScanCursor::after_key)
        } else {
            None
        };
        if keys.is_empty() {
            return Ok(ScanPage::new(Vec::new(), next));
        }
        let mut pipe = ::redis::pipe();
        for key in &keys {
            pipe.cmd("HMGET")
                .arg(self.link_key(key))
                .arg(&META_FIELDS[..]);
        }
        let rows: Vec<Vec<Option<Vec<u8>>>> = pipe.query_async(&mut conn).await.map_err(backend)?;
        let mut links = Vec::with_capacity(keys.len());
        for (key, fields) in keys.into_iter().zip(rows) {
            // Deleted between the two reads: a link deleted during the walk may be missed.
            if let Some((meta, version)) = parse_meta(&key, fields)? {
                links.push(ScannedLink::new(key, meta, version));
            }
        }
        Ok(ScanPage::new(links, next))
    }

    async fn try_lease(
        &self,
        key: &TokenKey,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<LeaseAttempt, StoreError> {
        let token = LeaseToken::random();
        let mut inv = SCRIPTS.try_lease.prepare_invoke();
        inv.key(self.link_key(key))
            .arg(holder.as_str())
            .arg(duration_ms(ttl))
            .arg(token.as_str());
        let answer: Vec<i64> = self.run(&inv).await?;
        match answer[..] {
            [0] => Ok(LeaseAttempt::Missing),
            [1] => Ok(LeaseAttempt::Busy),
            [2, until] => Ok(LeaseAttempt::Acquired(Lease::new(
                key.clone(),
                holder.clone(),
                token,
                lease_until(key, until)?,
            ))),
            _ => Err(StoreError::backend(
                STORE,
                UnexpectedReply("try_lease script"),
            )),
        }
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut inv = SCRIPTS.release.prepare_invoke();
        inv.key(self.link_key(&lease.key)).arg(lease.token.as_str());
        let _released: i64 = self.run(&inv).await?;
        Ok(())
    }

    async fn extend_lease(
        &self,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let mut inv = SCRIPTS.extend.prepare_invoke();
        inv.key(self.link_key(&lease.key))
            .arg(lease.token.as_str())
            .arg(duration_ms(ttl));
        let until: Option<i64> = self.run(&inv).await?;
        let Some(until) = until else { return Ok(None) };
        let mut extended = lease.clone();
        extended.expires_at = lease_until(&lease.key, until)?;
        Ok(Some(extended))
    }

    async fn delete_and_enqueue_revocation(
        &self,
        key: &TokenKey,
        expected: Option<Version>,
        revocation: &PendingRevocation,
    ) -> Result<bool, StoreError> {
        let mut inv = SCRIPTS.delete_enqueue.prepare_invoke();
        inv.key(self.link_key(key))
            .key(self.subject_key(&key.realm, &key.subject))
            .key(self.scan_key())
            .key(self.revocation_key(&revocation.id))
            .key(self.revocation_queue_key())
            .arg(expected.as_ref().map_or_else(String::new, version_arg))
            .arg(key.provider.as_str())
            .arg(scan_member(key));
        push_revocation(&mut inv, revocation);
        inv.arg(self.changes_channel());
        match self.run::<i64>(&inv).await? {
            1 => Ok(true),
            0 => Ok(false),
            _ => Err(StoreError::Conflict { key: key.clone() }),
        }
    }

    async fn enqueue_revocation(&self, revocation: &PendingRevocation) -> Result<(), StoreError> {
        let mut inv = SCRIPTS.enqueue.prepare_invoke();
        inv.key(self.revocation_key(&revocation.id))
            .key(self.revocation_queue_key());
        push_revocation(&mut inv, revocation);
        let _: i64 = self.run(&inv).await?;
        Ok(())
    }

    async fn claim_revocations(
        &self,
        now: OffsetDateTime,
        until: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<PendingRevocation>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut inv = SCRIPTS.claim.prepare_invoke();
        inv.key(self.revocation_queue_key())
            .arg(to_ms(now))
            .arg(to_ms(until))
            .arg(limit)
            .arg(self.revocation_prefix());
        let rows: Vec<Vec<Option<Vec<u8>>>> = self.run(&inv).await?;
        rows.into_iter().map(parse_revocation).collect()
    }

    async fn reschedule_revocation(
        &self,
        claimed: &PendingRevocation,
        due_at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        let mut inv = SCRIPTS.reschedule.prepare_invoke();
        inv.key(self.revocation_key(&claimed.id))
            .key(self.revocation_queue_key())
            .arg(claimed.attempts)
            .arg(to_ms(due_at))
            .arg(claimed.id.as_str());
        Ok(self.run::<i64>(&inv).await? == 1)
    }

    async fn remove_revocation(&self, id: &RevocationId) -> Result<(), StoreError> {
        let mut inv = SCRIPTS.remove.prepare_invoke();
        inv.key(self.revocation_key(id))
            .key(self.revocation_queue_key())
            .arg(id.as_str());
        let _: i64 = self.run(&inv).await?;
        Ok(())
    }
}

/// Adds an outbox entry's eight fields to a script invocation.
fn push_revocation(inv: &mut ::redis::ScriptInvocation<'_>, r: &PendingRevocation) {
    inv.arg(r.id.as_str())
        .arg(r.key.realm.as_str())
        .arg(r.key.subject.as_str())
        .arg(r.key.provider.as_str())
        .arg(r.payload.expose_secret())
        .arg(r.attempts)
        .arg(to_ms(r.due_at))
        .arg(to_ms(r.created_at));
}

/// One entry as the claim script returns it.
fn parse_revocation(fields: Vec<Option<Vec<u8>>>) -> Result<PendingRevocation, StoreError> {
    let text = |i: usize| -> Option<String> {
        fields
            .get(i)
            .cloned()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    let id = text(0).ok_or_else(|| invalid_key("outbox entry without an id"))?;
    let (Some(realm), Some(subject), Some(provider)) = (text(1), text(2), text(3)) else {
        return Err(invalid_key(&format!("outbox entry {id} without its key")));
    };
    let key = TokenKey::parse(&realm, &subject, &provider)
        .map_err(|e| invalid_key(&format!("outbox entry {id}: key does not parse: {e}")))?;
    let corrupt = |reason: String| StoreError::Corrupt {
        key: key.clone(),
        reason: format!("outbox entry {id}: {reason}"),
        version: None,
    };
    let number = |i: usize, field: &str| -> Result<i64, StoreError> {
        text(i)
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| corrupt(format!("field {field} is missing or not a number")))
    };
    let payload = fields
        .get(4)
        .cloned()
        .flatten()
        .ok_or_else(|| corrupt("field payload is missing".into()))?;
    let attempts = u32::try_from(number(5, "attempts")?)
        .map_err(|_| corrupt("field attempts is out of range".into()))?;
    let due_at = from_ms(number(6, "due_at")?, "due_at").map_err(corrupt)?;
    let created_at = from_ms(number(7, "created_at")?, "created_at").map_err(corrupt)?;
    Ok(PendingRevocation::from_parts(
        RevocationId::new(id.clone()),
        key.clone(),
        Payload::new(payload),
        attempts,
        due_at,
        created_at,
    ))
}

fn version_of(key: &TokenKey, version: Option<i64>) -> Result<Version, StoreError> {
    match version {
        Some(n) if n > 0 => Ok(Version::from_number(n as u64)),
        Some(n) => Err(StoreError::Corrupt {
            key: key.clone(),
            reason: format!("version counter holds {n}"),
            version: None,
        }),
        None => Err(StoreError::Conflict { key: key.clone() }),
    }
}

/// A script answered in a shape it never returns (a server-side bug or a foreign script under
/// the same SHA).
#[derive(Debug)]
struct UnexpectedReply(&'static str);

impl fmt::Display for UnexpectedReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unexpected reply from the {}", self.0)
    }
}

impl std::error::Error for UnexpectedReply {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_parts_cannot_collide_or_open_a_hash_tag() {
        assert_eq!(encode("a:b{c}%"), "a%3Ab%7Bc%7D%25");
        let a = TokenKey::parse("r", "a:b", "p").unwrap();
        let b = TokenKey::parse("r:a", "b", "p").unwrap();
        assert_ne!(
            format!(
                "{}:{}",
                encode(a.realm.as_str()),
                encode(a.subject.as_str())
            ),
            format!(
                "{}:{}",
                encode(b.realm.as_str()),
                encode(b.subject.as_str())
            )
        );
    }

    #[test]
    fn scan_members_sort_in_key_order() {
        let keys = [
            TokenKey::parse("a", "a", "x").unwrap(),
            TokenKey::parse("a", "a b", "a").unwrap(),
            TokenKey::parse("a b", "a", "a").unwrap(),
            TokenKey::parse("ab", "a", "a").unwrap(),
            TokenKey::parse("é", "😀", "z").unwrap(),
        ];
        let mut by_member = keys.to_vec();
        by_member.sort_by_key(scan_member);
        let mut by_key = keys.to_vec();
        by_key.sort();
        assert_eq!(by_member, by_key);
        for k in &keys {
            assert_eq!(&key_of_member(&scan_member(k)).unwrap(), k);
        }
    }

    #[test]
    fn durations_round_up_to_whole_milliseconds() {
        assert_eq!(duration_ms(Duration::from_micros(1)), 1);
        assert_eq!(duration_ms(Duration::MAX), 100 * 366 * 24 * 3600 * 1000);
    }
}
