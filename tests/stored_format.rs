//! The stored format of a link, through the public API: committed byte fixtures of every
//! record format ever written keep decoding to every field (plain, and format 1 inside an
//! `EncryptedStore` envelope); format 2 round-trips byte-stably, with and without the account
//! and narrowed tokens; a newer format and garbage are typed errors.
//!
//! The fixtures live in `tests/fixtures/stored/` (see the README there for how each was made).

use std::path::PathBuf;
use std::time::Duration;

use time::OffsetDateTime;
use time::macros::datetime;
use tokenbroker::{
    DecodeError, Payload, ProviderTokens, Scopes, Secret, TokenKey, TokenSet, UpstreamAccount,
};

/// When every fixture set was obtained: 2026-01-01 00:00:00 UTC (unix 1767225600).
const OBTAINED: OffsetDateTime = datetime!(2026-01-01 0:00 UTC);

/// The key-encryption key of the encrypted fixture: id `fixture-k1`, bytes 0x00..=0x1f.
#[cfg(feature = "encryption")]
const FIXTURE_KEK_ID: &str = "fixture-k1";
#[cfg(feature = "encryption")]
const FIXTURE_KEK: [u8; 32] = {
    let mut k = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        k[i] = i as u8;
        i += 1;
    }
    k
};

/// The link the encrypted fixture was written for (its envelope is bound to this key).
fn fixture_key() -> TokenKey {
    TokenKey::parse("acme", "alice", "google").unwrap()
}

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/stored")
        .join(name)
}

const NARROW_CALENDAR: &str = "https://www.googleapis.com/auth/calendar.readonly";
const NARROW_GRAPH: &str = "api://graph/.default";

/// A set with every field set, built through the public API as the broker builds one: from a
/// provider's answer, then two narrowed tokens.
fn full_set() -> TokenSet {
    let mut answer = ProviderTokens::new(Secret::new("at-full \"quoted\" \\ ü 🔑"));
    answer.token_type = Some("DPoP".into());
    answer.refresh_token = Some(Secret::new("rt-full-1"));
    answer.id_token = Some(Secret::new(
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMDg3In0.c2lnbmF0dXJl",
    ));
    answer.expires_in = Some(Duration::from_secs(3600));
    answer.refresh_expires_in = Some(Duration::from_secs(7 * 24 * 3600));
    answer.scopes = Some(Scopes::parse(
        "openid email https://www.googleapis.com/auth/calendar",
    ));
    answer
        .extras
        .insert("ext_expires_in".into(), serde_json::json!(3599));
    answer.extras.insert(
        "nested".into(),
        serde_json::json!({"b": [1, true, null], "a": "x"}),
    );
    let set = TokenSet::from_response(answer, OBTAINED, &Scopes::new());

    // Granted more than asked for: the slot is the request, the token keeps what was granted.
    let at = OBTAINED + Duration::from_secs(300);
    let calendar = TokenSet::new(Secret::new("at-narrow-calendar"), at)
        .with_expires_at(at + Duration::from_secs(3600))
        .with_scopes(Scopes::parse(&format!("{NARROW_CALENDAR} openid")));
    let set = set.with_narrowed(&Scopes::parse(NARROW_CALENDAR), calendar);
    // No expiry, no scopes in the answer, another token type.
    let at = OBTAINED + Duration::from_secs(600);
    let graph = TokenSet::new(Secret::new("at-narrow-graph"), at).with_token_type("bearer");
    set.with_narrowed(&Scopes::parse(NARROW_GRAPH), graph)
}

/// A set with only an access token.
fn minimal_set() -> TokenSet {
    TokenSet::new(Secret::new("gho_minimal"), OBTAINED)
}

/// Writes the format-1 fixtures with the code of the commit it runs on. Ran once, on top of
/// 2fcca81, whose `TokenSet::to_payload` wrote format 1; later code writes another format, so
/// it refuses to run there.
#[cfg(feature = "encryption")]
#[tokio::test]
#[ignore = "writes tests/fixtures/stored/v1-*; ran once on the code that wrote format 1"]
async fn write_v1_fixtures() {
    use std::sync::Arc;
    use tokenbroker::store::{EncryptedStore, KeyId, LinkState, Record, RecordMeta, StaticKeyring};
    use tokenbroker::{MemoryStore, TokenStore};

    std::fs::create_dir_all(fixture_path("")).unwrap();
    let full = full_set().to_payload();
    assert!(
        full.expose_secret().starts_with(br#"{"v":1,"#),
        "this code does not write format 1: the v1 fixtures stay as they are"
    );
    std::fs::write(fixture_path("v1-full.json"), full.expose_secret()).unwrap();
    let minimal = minimal_set().to_payload();
    std::fs::write(fixture_path("v1-minimal.json"), minimal.expose_secret()).unwrap();

    let keys = StaticKeyring::new(KeyId::new(FIXTURE_KEK_ID).unwrap(), FIXTURE_KEK);
    let store = EncryptedStore::new(MemoryStore::new(), Arc::new(keys));
    let record = Record::new(
        full,
        RecordMeta::new(
            LinkState::Active,
            full_set().expires_at(),
            OBTAINED,
            OBTAINED,
        ),
    );
    store.insert(&fixture_key(), &record).await.unwrap();
    let raw = store.inner().load(&fixture_key()).await.unwrap().unwrap();
    std::fs::write(
        fixture_path("v1-full.envelope.bin"),
        raw.record.payload.expose_secret(),
    )
    .unwrap();
}

/// The account of the format-2 fixture: every field set.
fn fixture_account() -> UpstreamAccount {
    UpstreamAccount::new(
        Some("https://login.microsoftonline.com/9188040d-6c67-4c5b-b112-36a304b66dad/v2.0".into()),
        "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
    )
    .with_tenant_id("9188040d-6c67-4c5b-b112-36a304b66dad")
    .with_email("alice@example.com")
}

/// Writes the format-2 fixtures. Ran once, on the commit that added them; the test
/// `v2_writer_is_byte_stable` then holds every later writer to these bytes.
#[test]
#[ignore = "writes tests/fixtures/stored/v2-*; ran once on the code that wrote format 2 first"]
fn write_v2_fixtures() {
    let full = full_set().with_account(fixture_account()).to_payload();
    assert!(
        full.expose_secret().starts_with(br#"{"v":2,"#),
        "this code does not write format 2: the v2 fixtures stay as they are"
    );
    std::fs::write(fixture_path("v2-full.json"), full.expose_secret()).unwrap();
    let minimal = minimal_set().to_payload();
    std::fs::write(fixture_path("v2-minimal.json"), minimal.expose_secret()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Every committed fixture decodes, to every field.

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture_path(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn exposed(secret: Option<&Secret>) -> Option<&str> {
    secret.map(Secret::expose_secret)
}

/// Checks every field of the set [`full_set`] builds, through the public API only.
#[track_caller]
fn assert_full_set(set: &TokenSet) {
    assert_eq!(
        set.access_token().expose_secret(),
        "at-full \"quoted\" \\ ü 🔑"
    );
    assert_eq!(set.token_type(), "DPoP");
    assert_eq!(exposed(set.refresh_token()), Some("rt-full-1"));
    assert_eq!(
        exposed(set.id_token()),
        Some("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiIxMDg3In0.c2lnbmF0dXJl")
    );
    assert_eq!(set.expires_at(), Some(datetime!(2026-01-01 1:00 UTC)));
    assert_eq!(
        set.refresh_expires_at(),
        Some(datetime!(2026-01-08 0:00 UTC))
    );
    assert_eq!(
        set.scopes(),
        &Scopes::parse("email openid https://www.googleapis.com/auth/calendar")
    );
    assert_eq!(set.obtained_at(), OBTAINED);
    assert_eq!(
        serde_json::to_value(set.extras()).unwrap(),
        serde_json::json!({"ext_expires_in": 3599, "nested": {"a": "x", "b": [1, true, null]}})
    );

    // Exactly the two narrowed slots (Debug lists the slots' names, never their tokens).
    let debug = format!("{set:?}");
    assert!(
        debug.contains(&format!(
            "narrowed: [{NARROW_GRAPH:?}, {NARROW_CALENDAR:?}]"
        )),
        "{debug}"
    );
    let calendar = set
        .narrowed_to(&Scopes::parse(NARROW_CALENDAR))
        .expect("calendar slot");
    assert_eq!(
        calendar.access_token().expose_secret(),
        "at-narrow-calendar"
    );
    assert_eq!(calendar.token_type(), "Bearer");
    assert_eq!(calendar.expires_at(), Some(datetime!(2026-01-01 1:05 UTC)));
    assert_eq!(
        calendar.scopes(),
        &Scopes::parse(&format!("openid {NARROW_CALENDAR}"))
    );
    assert_eq!(calendar.obtained_at(), datetime!(2026-01-01 0:05 UTC));
    // A narrowed view shares the link's refresh and ID tokens.
    assert_eq!(exposed(calendar.refresh_token()), Some("rt-full-1"));
    assert_eq!(exposed(calendar.id_token()), exposed(set.id_token()));

    let graph = set
        .narrowed_to(&Scopes::parse(NARROW_GRAPH))
        .expect("graph slot");
    assert_eq!(graph.access_token().expose_secret(), "at-narrow-graph");
    assert_eq!(graph.token_type(), "bearer");
    assert_eq!(graph.expires_at(), None);
    assert!(graph.scopes().is_empty());
    assert_eq!(graph.obtained_at(), datetime!(2026-01-01 0:10 UTC));
}

/// Checks every field of the set [`minimal_set`] builds.
#[track_caller]
fn assert_minimal_set(set: &TokenSet) {
    assert_eq!(set.access_token().expose_secret(), "gho_minimal");
    assert_eq!(set.token_type(), "Bearer");
    assert!(set.refresh_token().is_none());
    assert!(set.id_token().is_none());
    assert_eq!(set.expires_at(), None);
    assert_eq!(set.refresh_expires_at(), None);
    assert!(set.scopes().is_empty());
    assert_eq!(set.obtained_at(), OBTAINED);
    assert!(set.extras().is_empty());
    assert!(format!("{set:?}").contains("narrowed: []"));
    assert!(set.account().is_none());
}

#[test]
fn the_builders_match_what_the_fixtures_hold() {
    assert_full_set(&full_set());
    assert_minimal_set(&minimal_set());
}

#[test]
fn v1_full_fixture_decodes_every_field() {
    let set = TokenSet::from_payload(&Payload::new(read_fixture("v1-full.json"))).unwrap();
    assert_full_set(&set);
    // Format 1 never held the account.
    assert!(set.account().is_none());
}

#[test]
fn v1_minimal_fixture_decodes_every_field() {
    let set = TokenSet::from_payload(&Payload::new(read_fixture("v1-minimal.json"))).unwrap();
    assert_minimal_set(&set);
}

/// A format-1 record is written back as format 2 (on the next refresh or re-link) without
/// losing anything.
#[test]
fn v1_fixtures_rewritten_as_v2_keep_every_field() {
    let full = TokenSet::from_payload(&Payload::new(read_fixture("v1-full.json"))).unwrap();
    let rewritten = full.to_payload();
    assert!(rewritten.expose_secret().starts_with(br#"{"v":2,"#));
    assert_full_set(&TokenSet::from_payload(&rewritten).unwrap());

    let minimal = TokenSet::from_payload(&Payload::new(read_fixture("v1-minimal.json"))).unwrap();
    assert_minimal_set(&TokenSet::from_payload(&minimal.to_payload()).unwrap());
}

#[test]
fn v2_full_fixture_decodes_every_field() {
    let set = TokenSet::from_payload(&Payload::new(read_fixture("v2-full.json"))).unwrap();
    assert_full_set(&set);
    let account = set.account().expect("account");
    assert_eq!(account, &fixture_account());
    assert_eq!(
        account.issuer.as_deref(),
        Some("https://login.microsoftonline.com/9188040d-6c67-4c5b-b112-36a304b66dad/v2.0")
    );
    assert_eq!(
        account.subject,
        "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ"
    );
    assert_eq!(
        account.tenant_id.as_deref(),
        Some("9188040d-6c67-4c5b-b112-36a304b66dad")
    );
    assert_eq!(account.email(), Some("alice@example.com"));
    // Narrowed views belong to the same account.
    let calendar = set.narrowed_to(&Scopes::parse(NARROW_CALENDAR)).unwrap();
    assert_eq!(calendar.account(), Some(&fixture_account()));
}

#[test]
fn v2_minimal_fixture_decodes_every_field() {
    let set = TokenSet::from_payload(&Payload::new(read_fixture("v2-minimal.json"))).unwrap();
    assert_minimal_set(&set);
}

/// Today's writer writes exactly the committed format-2 bytes: a change to the layout needs
/// a new format version (and new fixtures), not an edit of these.
#[test]
fn v2_writer_is_byte_stable() {
    let full = full_set().with_account(fixture_account()).to_payload();
    assert_eq!(
        std::str::from_utf8(full.expose_secret()).unwrap(),
        std::str::from_utf8(&read_fixture("v2-full.json")).unwrap()
    );
    assert_eq!(
        minimal_set().to_payload().expose_secret(),
        read_fixture("v2-minimal.json").as_slice()
    );
}

/// With and without the account and narrowed tokens, a set reads back unchanged and writes
/// back to the same bytes.
#[test]
fn v2_round_trips_with_and_without_account_and_narrowed_tokens() {
    let only_subject = UpstreamAccount::new(None, "12345");
    let cases = [
        (full_set(), true),
        (full_set().with_account(fixture_account()), true),
        (full_set().with_account(only_subject.clone()), true),
        (minimal_set(), false),
        (minimal_set().with_account(fixture_account()), false),
        (minimal_set().with_account(only_subject), false),
    ];
    for (set, full) in cases {
        let bytes = set.to_payload();
        let back = TokenSet::from_payload(&bytes).unwrap();
        if full {
            assert_full_set(&back);
        } else {
            assert_eq!(back.access_token().expose_secret(), "gho_minimal");
            assert!(format!("{back:?}").contains("narrowed: []"));
        }
        assert_eq!(back.account(), set.account());
        assert_eq!(
            back.account().and_then(UpstreamAccount::email),
            set.account().and_then(UpstreamAccount::email)
        );
        assert_eq!(back.to_payload().expose_secret(), bytes.expose_secret());
    }
}

#[test]
fn a_newer_format_is_a_typed_error_naming_its_version() {
    let v3 = br#"{"v":3,"tokens":{"access_token":"at"},"whatever":[]}"#.to_vec();
    let err = TokenSet::from_payload(&Payload::new(v3)).unwrap_err();
    assert_eq!(err, DecodeError::UnsupportedVersion { version: 3 });
    assert_eq!(
        err.to_string(),
        "token set payload could not be decoded: unsupported stored format version 3"
    );
}

#[test]
fn garbage_is_a_malformed_error() {
    let full = read_fixture("v2-full.json");
    for bytes in [
        b"".to_vec(),
        b"\xff\xfe".to_vec(),
        b"[1,2]".to_vec(),
        br#"{"v":"2"}"#.to_vec(),
        br#"{"v":2,"tokens":{"access_token":7}}"#.to_vec(),
        full[..full.len() / 2].to_vec(),
        full[..full.len() - 1].to_vec(),
    ] {
        match TokenSet::from_payload(&Payload::new(bytes.clone())) {
            Err(DecodeError::Malformed { .. }) => {}
            other => panic!("{}: {other:?}", String::from_utf8_lossy(&bytes)),
        }
    }
}

/// Today's envelope, as `EncryptedStore` wrote it into its inner store, still opens with the
/// keyring it was written under and holds the format-1 payload.
#[cfg(feature = "encryption")]
#[tokio::test]
async fn v1_encrypted_fixture_loads_through_encrypted_store() {
    use std::sync::Arc;
    use tokenbroker::store::{EncryptedStore, KeyId, LinkState, Record, RecordMeta, StaticKeyring};
    use tokenbroker::{MemoryStore, TokenStore};

    let inner = MemoryStore::new();
    let meta = RecordMeta::new(LinkState::Active, None, OBTAINED, OBTAINED);
    let raw = Record::new(Payload::new(read_fixture("v1-full.envelope.bin")), meta);
    inner.insert(&fixture_key(), &raw).await.unwrap();
    let keys = StaticKeyring::new(KeyId::new(FIXTURE_KEK_ID).unwrap(), FIXTURE_KEK);
    let store = EncryptedStore::new(inner, Arc::new(keys));

    let loaded = store.load(&fixture_key()).await.unwrap().expect("record");
    assert_eq!(
        loaded.record.payload.expose_secret(),
        read_fixture("v1-full.json").as_slice()
    );
    let set = TokenSet::from_payload(&loaded.record.payload).unwrap();
    assert_full_set(&set);

    // Written back (as a refresh would), it is sealed again, now holding format 2.
    let meta = RecordMeta::new(LinkState::Active, set.expires_at(), OBTAINED, OBTAINED);
    let rewritten = Record::new(set.to_payload(), meta);
    store
        .compare_and_swap(&fixture_key(), loaded.version, &rewritten, None)
        .await
        .unwrap();
    let reloaded = store.load(&fixture_key()).await.unwrap().expect("record");
    assert!(
        reloaded
            .record
            .payload
            .expose_secret()
            .starts_with(br#"{"v":2,"#)
    );
    assert_full_set(&TokenSet::from_payload(&reloaded.record.payload).unwrap());

    // Bound to its link: the same bytes under another key do not open.
    let other = TokenKey::parse("acme", "bob", "google").unwrap();
    store.inner().insert(&other, &raw).await.unwrap();
    assert!(store.load(&other).await.is_err());
}
