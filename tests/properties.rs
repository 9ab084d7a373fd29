//! Property tests: scope-set normalisation, `TokenSet::merge` never losing a refresh token,
//! stored records (any set round-trips byte-stably; any bytes decode or fail, never panic), and
//! store writes under random interleavings (MemoryStore, and two pools over one SQLite file)
//! keeping one winner per version and never repeating a version.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use proptest::prelude::*;
use time::OffsetDateTime;
use tokenbroker::store::{LinkState, Record, RecordMeta, Version};
use tokenbroker::{
    MemoryStore, Payload, Scopes, Secret, StoreError, TokenKey, TokenSet, TokenStore,
    UpstreamAccount,
};

// ---------------------------------------------------------------------------------------------
// Scopes

/// One scope token as RFC 6749 §3.3 allows it (`%x21 / %x23-5B / %x5D-7E`), minus the comma,
/// which providers use as a separator and the parser splits on.
fn scope_token() -> impl Strategy<Value = String> {
    "[!#-+\\--\\[\\]-~]{1,12}"
}

fn separator() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(" ".to_owned()),
        Just(",".to_owned()),
        Just(", ".to_owned()),
        Just("\t".to_owned()),
        Just("  \n ".to_owned()),
        Just(" ,, ".to_owned()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Order, duplicates, separators and surrounding whitespace do not matter; the displayed
    /// form parses back to the same set; JSON (string or list) round-trips.
    #[test]
    fn scopes_normalise(
        tokens in prop::collection::vec(scope_token(), 0..8),
        seps in prop::collection::vec(separator(), 16),
        order in prop::collection::vec(any::<prop::sample::Index>(), 0..16),
        lead in "[ \t,]{0,3}",
        trail in "[ \t,]{0,3}",
    ) {
        let expected: BTreeSet<String> = tokens.iter().cloned().collect();
        // Some permutation with repeats of the tokens, joined by assorted separators.
        let mut picked: Vec<&String> = tokens.iter().collect();
        if !tokens.is_empty() {
            picked.extend(order.iter().map(|i| &tokens[i.index(tokens.len())]));
            picked.reverse();
        }
        let mut text = lead.clone();
        for (i, t) in picked.iter().enumerate() {
            if i > 0 {
                text.push_str(&seps[i % seps.len()]);
            }
            text.push_str(t);
        }
        text.push_str(&trail);

        let parsed = Scopes::parse(&text);
        prop_assert_eq!(parsed.iter().map(String::from).collect::<BTreeSet<_>>(), expected.clone());
        prop_assert_eq!(parsed.len(), expected.len());
        // Display -> parse is the identity.
        prop_assert_eq!(Scopes::parse(&parsed.to_string()), parsed.clone());
        prop_assert_eq!(parsed.to_string(), expected.iter().cloned().collect::<Vec<_>>().join(" "));
        // From a list, in any order, with the same items.
        let listed: Scopes = picked.iter().map(|s| s.as_str()).collect();
        prop_assert_eq!(&listed, &parsed);
        // JSON as a string and as a list.
        let json = serde_json::to_string(&parsed).unwrap();
        prop_assert_eq!(serde_json::from_str::<Scopes>(&json).unwrap(), parsed.clone());
        let list_json = serde_json::to_string(&picked).unwrap();
        prop_assert_eq!(serde_json::from_str::<Scopes>(&list_json).unwrap(), parsed.clone());
        // Building by insert gives the same set.
        let mut inserted = Scopes::new();
        for t in &picked {
            inserted.insert(t.as_str());
        }
        prop_assert_eq!(inserted, parsed);
    }

    /// Whatever the text (any Unicode, separators inside list items), a set survives
    /// display/parse and a stored payload unchanged.
    #[test]
    fn scopes_survive_storage(items in prop::collection::vec(any::<String>(), 0..6)) {
        let scopes: Scopes = items.iter().map(String::as_str).collect();
        prop_assert_eq!(Scopes::parse(&scopes.to_string()), scopes.clone());
        prop_assert!(scopes.iter().all(|s| !s.is_empty() && !s.contains(',') && !s.contains(char::is_whitespace)));
        let set = TokenSet::new(Secret::new("at"), OffsetDateTime::UNIX_EPOCH).with_scopes(scopes.clone());
        let back = TokenSet::from_payload(&set.to_payload()).unwrap();
        prop_assert_eq!(back.scopes(), &scopes);
    }
}

// ---------------------------------------------------------------------------------------------
// TokenSet::merge

#[derive(Debug, Clone)]
struct Answer {
    refresh_token: Option<u16>,
    refresh_expires_in: Option<u32>,
    id_token: bool,
}

fn answer() -> impl Strategy<Value = Answer> {
    (
        prop::option::of(any::<u16>()),
        prop::option::of(1u32..10_000_000),
        any::<bool>(),
    )
        .prop_map(|(refresh_token, refresh_expires_in, id_token)| Answer {
            refresh_token,
            refresh_expires_in,
            id_token,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Folding any sequence of answers (with and without refresh tokens) into a linked set:
    /// the refresh token is always the newest one any answer carried (or the original), with
    /// that answer's expiry; the access token is always the newest; a payload round trip in
    /// between changes nothing.
    #[test]
    fn merge_never_loses_a_refresh_token(
        initial_rt in prop::option::of(any::<u16>()),
        answers in prop::collection::vec(answer(), 0..24),
        through_store in any::<bool>(),
    ) {
        let t0 = OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap();
        let mut stored = TokenSet::new(Secret::new("at-0"), t0);
        if let Some(rt) = initial_rt {
            stored = stored.with_refresh_token(Secret::new(format!("rt-{rt}")));
        }
        let mut expect_rt = initial_rt.map(|rt| format!("rt-{rt}"));
        let mut expect_rt_exp: Option<OffsetDateTime> = None;
        for (i, a) in answers.iter().enumerate() {
            let now = t0 + Duration::from_secs(60 * (i as u64 + 1));
            let mut newer = TokenSet::new(Secret::new(format!("at-{}", i + 1)), now);
            if let Some(rt) = a.refresh_token {
                newer = newer.with_refresh_token(Secret::new(format!("rt-{rt}")));
                let exp = a.refresh_expires_in.map(|s| now + Duration::from_secs(s.into()));
                if let Some(exp) = exp {
                    newer = newer.with_refresh_expires_at(exp);
                }
                expect_rt = Some(format!("rt-{rt}"));
                expect_rt_exp = exp;
            }
            if a.id_token {
                newer = newer.with_id_token(Secret::new(format!("id-{i}")));
            }
            let had_rt = stored.refresh_token().is_some();
            let rotated = stored.is_rotated_by(&newer);
            stored = stored.merge(newer);
            if had_rt {
                prop_assert!(stored.refresh_token().is_some(), "refresh token dropped at answer {}", i);
            }
            if through_store {
                stored = TokenSet::from_payload(&stored.to_payload()).unwrap();
            }
            prop_assert_eq!(stored.access_token().expose_secret(), format!("at-{}", i + 1));
            prop_assert_eq!(stored.refresh_token().map(|s| s.expose_secret().to_owned()), expect_rt.clone());
            prop_assert_eq!(stored.refresh_expires_at(), expect_rt_exp);
            if rotated {
                prop_assert!(a.refresh_token.is_some());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stored records

/// Whole-second instants from 1900 to 9999 (the stored format keeps seconds).
fn instant() -> impl Strategy<Value = OffsetDateTime> {
    (-2_208_988_800i64..=253_402_300_799)
        .prop_map(|s| OffsetDateTime::from_unix_timestamp(s).unwrap())
}

/// JSON values as providers send them in extra fields (no floats: JSON numbers with a
/// fraction need not parse back to the same `f64`).
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(any::<String>(), inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn upstream_account() -> impl Strategy<Value = UpstreamAccount> {
    (
        prop::option::of(any::<String>()),
        any::<String>(),
        prop::option::of(any::<String>()),
        prop::option::of(any::<String>()),
    )
        .prop_map(|(iss, sub, tid, email)| {
            let mut a = UpstreamAccount::new(iss, sub);
            if let Some(tid) = tid {
                a = a.with_tenant_id(tid);
            }
            if let Some(email) = email {
                a = a.with_email(email);
            }
            a
        })
}

/// One narrowed answer: the scopes asked for, and the access token, type, expiry, scopes and
/// time of the answer.
type Narrowed = (
    Scopes,
    String,
    String,
    Option<OffsetDateTime>,
    Scopes,
    OffsetDateTime,
);

fn narrowed() -> impl Strategy<Value = Narrowed> {
    (
        prop::collection::vec(scope_token(), 0..3),
        any::<String>(),
        "[A-Za-z]{0,8}",
        prop::option::of(instant()),
        prop::collection::vec(scope_token(), 0..3),
        instant(),
    )
        .prop_map(|(asked, at, ty, exp, granted, obtained)| {
            let asked = asked.iter().map(String::as_str).collect();
            let granted = granted.iter().map(String::as_str).collect();
            (asked, at, ty, exp, granted, obtained)
        })
}

/// Any set the public API can build, with the narrowed scopes it was given.
fn token_set() -> impl Strategy<Value = (TokenSet, Vec<Scopes>)> {
    (
        (
            any::<String>(),
            "[A-Za-z]{0,8}",
            prop::option::of(any::<String>()),
            prop::option::of(any::<String>()),
        ),
        (
            prop::option::of(instant()),
            prop::option::of(instant()),
            instant(),
        ),
        prop::collection::vec(any::<String>(), 0..4),
        prop::collection::btree_map("[a-z_]{1,12}", json_value(), 0..4),
        prop::collection::vec(narrowed(), 0..3),
        prop::option::of(upstream_account()),
    )
        .prop_map(
            |((at, ty, rt, idt), (exp, rexp, obtained), scopes, extras, narrowed, account)| {
                let mut set = TokenSet::new(Secret::new(at), obtained)
                    .with_token_type(ty)
                    .with_scopes(scopes.iter().map(String::as_str).collect());
                if let Some(rt) = rt {
                    set = set.with_refresh_token(Secret::new(rt));
                }
                if let Some(idt) = idt {
                    set = set.with_id_token(Secret::new(idt));
                }
                if let Some(exp) = exp {
                    set = set.with_expires_at(exp);
                }
                if let Some(rexp) = rexp {
                    set = set.with_refresh_expires_at(rexp);
                }
                for (name, value) in extras {
                    set = set.with_extra(name, value);
                }
                if let Some(account) = account {
                    set = set.with_account(account);
                }
                let mut asked_for = Vec::new();
                for (asked, at, ty, exp, granted, obtained) in narrowed {
                    let mut answer = TokenSet::new(Secret::new(at), obtained)
                        .with_token_type(ty)
                        .with_scopes(granted);
                    if let Some(exp) = exp {
                        answer = answer.with_expires_at(exp);
                    }
                    set = set.with_narrowed(&asked, answer);
                    asked_for.push(asked);
                }
                (set, asked_for)
            },
        )
}

/// Everything the public API shows of a set (tokens included), and of its narrowed views for
/// the scopes given.
fn visible(set: &TokenSet, narrowed: &[Scopes]) -> String {
    let view = |s: &TokenSet| {
        format!(
            "{:?} {:?} {:?} {:?} {:?} {:?}",
            s,
            s.access_token().expose_secret(),
            s.refresh_token().map(Secret::expose_secret),
            s.id_token().map(Secret::expose_secret),
            s.extras(),
            s.account().map(|a| (a, a.email())),
        )
    };
    let mut out = view(set);
    for scopes in narrowed {
        out.push_str(&format!(
            "\n{scopes}: {:?}",
            set.narrowed_to(scopes).as_ref().map(view)
        ));
    }
    out
}

/// A valid record with one change: cut short, a byte replaced, or a byte put in.
fn mutated(bytes: &[u8], at: prop::sample::Index, byte: u8, how: u8) -> Vec<u8> {
    let mut bytes = bytes.to_vec();
    let i = at.index(bytes.len().max(1)).min(bytes.len());
    match how % 3 {
        0 => bytes.truncate(i),
        1 if i < bytes.len() => bytes[i] = byte,
        _ => bytes.insert(i, byte),
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any set survives the store unchanged, and its bytes are stable: writing what was read
    /// gives the same bytes.
    #[test]
    fn stored_records_round_trip((set, narrowed) in token_set()) {
        let bytes = set.to_payload();
        let back = TokenSet::from_payload(&bytes).unwrap();
        prop_assert_eq!(visible(&back, &narrowed), visible(&set, &narrowed));
        let again = back.to_payload();
        prop_assert_eq!(again.expose_secret(), bytes.expose_secret());
    }

    /// Any bytes decode or fail; nothing panics.
    #[test]
    fn any_bytes_decode_or_fail(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = TokenSet::from_payload(&Payload::new(bytes));
    }

    /// A damaged record of either format is an error or some set, never a panic; a set it
    /// decodes to stores and reads back.
    #[test]
    fn damaged_records_decode_or_fail(
        (set, _) in token_set(),
        v1 in any::<bool>(),
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        how in any::<u8>(),
    ) {
        let valid = if v1 {
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/stored/v1-full.json")).unwrap()
        } else {
            set.to_payload().expose_secret().to_vec()
        };
        if let Ok(set) = TokenSet::from_payload(&Payload::new(mutated(&valid, at, byte, how))) {
            let again = TokenSet::from_payload(&set.to_payload()).unwrap();
            prop_assert_eq!(visible(&again, &[]), visible(&set, &[]));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Stores under random interleavings

#[derive(Debug, Clone, Copy)]
enum Op {
    Insert,
    /// Compare-and-swap on the version just loaded.
    Cas,
    /// Delete the version just loaded.
    DeleteVersioned,
    /// Delete whatever is there.
    DeleteAny,
    /// Load, and yield before acting on it (widens the race windows).
    Stall,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Insert),
        6 => Just(Op::Cas),
        1 => Just(Op::DeleteVersioned),
        1 => Just(Op::DeleteAny),
        1 => Just(Op::Stall),
    ]
}

/// What one task saw: successful writes as (based-on version, new version, tag), and
/// successful versioned deletes of a version.
#[derive(Default, Debug)]
struct Log {
    writes: Vec<(Option<Version>, Version, String)>,
    deleted: Vec<Version>,
}

fn record(tag: &str) -> Record {
    let now = OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap();
    Record::new(
        Payload::new(tag.as_bytes().to_vec()),
        RecordMeta::new(LinkState::Active, None, now, now),
    )
}

async fn run_task(
    store: Arc<dyn TokenStore>,
    key: TokenKey,
    task: usize,
    ops: Vec<Op>,
) -> Result<Log, StoreError> {
    let mut log = Log::default();
    for (i, op) in ops.into_iter().enumerate() {
        let tag = format!("t{task}-op{i}");
        let current = store.load(&key).await?;
        tokio::task::yield_now().await;
        let outcome = match (op, &current) {
            (Op::Stall, _) => {
                tokio::task::yield_now().await;
                continue;
            }
            (Op::Insert, _) => store
                .insert(&key, &record(&tag))
                .await
                .map(|v| log.writes.push((None, v, tag))),
            (Op::Cas, Some(cur)) => store
                .compare_and_swap(&key, cur.version.clone(), &record(&tag), None)
                .await
                .map(|v| log.writes.push((Some(cur.version.clone()), v, tag))),
            (Op::Cas, None) => continue,
            (Op::DeleteVersioned, Some(cur)) => store
                .delete(&key, Some(cur.version.clone()))
                .await
                .map(|deleted| {
                    if deleted {
                        log.deleted.push(cur.version.clone());
                    }
                }),
            (Op::DeleteVersioned, None) => continue,
            (Op::DeleteAny, _) => store.delete(&key, None).await.map(|_| ()),
        };
        match outcome {
            Ok(()) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(log)
}

/// Runs the tasks concurrently (task `i` on `stores[i % len]`) and checks the invariants.
async fn interleave(stores: &[Arc<dyn TokenStore>], key: &TokenKey, tasks: Vec<Vec<Op>>) {
    let mut handles = Vec::new();
    for (i, ops) in tasks.into_iter().enumerate() {
        let store = stores[i % stores.len()].clone();
        handles.push(tokio::spawn(run_task(store, key.clone(), i, ops)));
    }
    let mut writes = Vec::new();
    let mut deleted = Vec::new();
    for h in handles {
        let log = h
            .await
            .expect("task panicked")
            .expect("store backend error");
        writes.extend(log.writes);
        deleted.extend(log.deleted);
    }
    // No version is ever handed out twice.
    let mut seen = HashSet::new();
    for (_, v, tag) in &writes {
        assert!(
            seen.insert(v.clone()),
            "version {v:?} handed out twice (again for {tag})"
        );
    }
    // Exactly one winner per version: a version is the base of at most one successful
    // compare-and-swap or versioned delete, and only of a version that was written.
    let mut consumed: HashMap<Version, usize> = HashMap::new();
    for v in writes
        .iter()
        .filter_map(|(base, _, _)| base.clone())
        .chain(deleted.iter().cloned())
    {
        assert!(
            seen.contains(&v),
            "a write won against unknown version {v:?}"
        );
        *consumed.entry(v).or_default() += 1;
    }
    for (v, n) in &consumed {
        assert_eq!(*n, 1, "{n} writers won against version {v:?}");
    }
    // What is stored is one of the successful writes, with its payload.
    let stored = stores[0].load(key).await.unwrap();
    if let Some(stored) = stored {
        let (_, _, tag) = writes
            .iter()
            .find(|(_, v, _)| *v == stored.version)
            .expect("the stored version was returned by a write");
        assert_eq!(stored.record.payload.expose_secret(), tag.as_bytes());
        assert!(
            !consumed.contains_key(&stored.version),
            "the stored version was already replaced or deleted"
        );
    }
}

fn tasks() -> impl Strategy<Value = Vec<Vec<Op>>> {
    prop::collection::vec(prop::collection::vec(op(), 1..16), 2..6)
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn fresh_key() -> TokenKey {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    TokenKey::parse(
        "acme",
        &format!("user-{}", SEQ.fetch_add(1, Ordering::Relaxed)),
        "fake",
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn memory_store_interleavings(tasks in tasks()) {
        let store: Arc<dyn TokenStore> = Arc::new(MemoryStore::new());
        runtime().block_on(interleave(&[store], &fresh_key(), tasks));
    }
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use tokenbroker::SqliteStore;

    /// Two pools over one SQLite file, as two broker instances would open it. The file lives
    /// in cargo's scratch directory for integration tests (statics are never dropped, so a
    /// temporary directory would be left behind in /tmp); each run starts it afresh.
    fn sqlite_stores() -> &'static [Arc<dyn TokenStore>] {
        static STORES: OnceLock<Vec<Arc<dyn TokenStore>>> = OnceLock::new();
        STORES.get_or_init(|| {
            let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
            let path = dir.join("properties-interleavings.db");
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
            runtime().block_on(async {
                let mut v: Vec<Arc<dyn TokenStore>> = Vec::new();
                for _ in 0..2 {
                    v.push(Arc::new(SqliteStore::open(&path).await.unwrap()));
                }
                v
            })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn sqlite_file_interleavings(tasks in tasks()) {
            runtime().block_on(interleave(sqlite_stores(), &fresh_key(), tasks));
        }
    }
}
