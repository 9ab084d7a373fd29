//! What [`EncryptedStore`](super::EncryptedStore) keeps in the inner store's payload, how it is
//! told apart from a plain record, and what each layer authenticates.
//!
//! Both envelope formats share one layout; only the meaning of the wrapped key differs:
//!
//! ```text
//! format: u8 | id_len: u8 | KEK id | wrapped_len: u16 BE | wrapped key | nonce (24) | ciphertext || tag (16)
//!            \____________________ header (the key caches' key) ____/
//! ```
//!
//! - **Format 2 (`0xE2`, written):** the wrapped key is an *intermediate key*, wrapped once by
//!   the [`KeyProvider`](super::KeyProvider) with the fixed context [`INTERMEDIATE_KEY_AAD`] and
//!   shared by every record one process writes during the key's lifetime. The payload is
//!   encrypted directly under it, authenticating [`record_aad_v2`]: the record's realm, subject
//!   and provider and the KEK id.
//! - **Format 1 (`0xE1`, read only):** the wrapped key is a per-record data key, wrapped with
//!   [`record_aad_v1`] as context; the payload is encrypted under it with the same AAD.
//!
//! A **plain record** (written before encryption was turned on) is a JSON object: its first byte
//! that is not JSON whitespace is `{`. No JSON text can start with a byte in `0xE0..=0xEF`
//! (JSON starts with whitespace or one of `{ [ " - 0-9 t f n`), and that range is reserved for
//! envelope formats, so a payload is never both. A payload that is neither is corrupt: in
//! particular an envelope that does not parse is never taken for a plain record.

use super::keys::put_len_prefixed;
use super::{KeyId, NONCE_LEN, TAG_LEN};
use crate::ids::TokenKey;

/// Envelope format 1: a per-record data key wrapped by the key provider (read only).
pub(super) const FORMAT_V1: u8 = 0xE1;
/// Envelope format 2: the payload under an intermediate key, wrapped once per key.
pub(super) const FORMAT_V2: u8 = 0xE2;
/// First bytes reserved for envelope formats; none of them can start a JSON text.
const RESERVED: std::ops::RangeInclusive<u8> = 0xE0..=0xEF;

/// The context an intermediate key is wrapped with: fixed, so that one wrapped key serves
/// every record. Distinct from every record AAD (which start with `tokenbroker/record/`), so a
/// wrapped intermediate key cannot pass for a format-1 data key, nor the reverse.
pub(super) const INTERMEDIATE_KEY_AAD: &[u8] = b"tokenbroker/intermediate-key/\xE2";

/// What a stored payload is.
pub(super) enum Parsed<'a> {
    /// An envelope that parsed (it may still fail to decrypt).
    Envelope(Envelope<'a>),
    /// Not an envelope: a JSON object, as the broker writes payloads. Not validated yet.
    Plain,
}

/// A parsed envelope, borrowing the stored bytes.
pub(super) struct Envelope<'a> {
    /// [`FORMAT_V1`] or [`FORMAT_V2`].
    pub(super) format: u8,
    /// The key-encryption key the wrapped key is under.
    pub(super) key_id: KeyId,
    /// `id_len | KEK id | wrapped_len | wrapped key`: names the wrapped key exactly (every
    /// part is length-prefixed), so the key caches use it as their key.
    pub(super) header: &'a [u8],
    /// The wrapped key, as the key provider returned it.
    pub(super) wrapped: &'a [u8],
    /// The payload's nonce.
    pub(super) nonce: &'a [u8],
    /// The payload's ciphertext and tag.
    pub(super) ciphertext: &'a [u8],
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], &'static str> {
    if rest.len() < n {
        return Err("truncated envelope");
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

/// Tells an envelope from a plain record, and parses the envelope. An error is a reason for
/// [`StoreError::Corrupt`](crate::StoreError::Corrupt).
pub(super) fn parse(bytes: &[u8]) -> Result<Parsed<'_>, &'static str> {
    let Some(&first) = bytes.first() else {
        return Err("empty payload");
    };
    match first {
        FORMAT_V1 | FORMAT_V2 => parse_envelope(bytes).map(Parsed::Envelope),
        b if RESERVED.contains(&b) => Err("unknown envelope format"),
        _ if starts_like_json_object(bytes) => Ok(Parsed::Plain),
        _ => Err("neither an envelope nor a plain record"),
    }
}

fn starts_like_json_object(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .is_some_and(|&b| b == b'{')
}

/// Whether a payload that [`parse`] called plain is one complete JSON object. A full parse,
/// done only when plain records are accepted: it keeps a tampered envelope whose first byte
/// became `{` from being served, or encrypted by a rewrap, as a plain record.
pub(super) fn is_json_object(bytes: &[u8]) -> bool {
    starts_like_json_object(bytes) && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

fn parse_envelope(bytes: &[u8]) -> Result<Envelope<'_>, &'static str> {
    let format = bytes[0];
    let mut rest = &bytes[1..];
    let id_len = usize::from(take(&mut rest, 1)?[0]);
    let key_id = std::str::from_utf8(take(&mut rest, id_len)?)
        .ok()
        .and_then(|id| KeyId::new(id).ok())
        .ok_or("invalid key id in envelope")?;
    let wrapped_len = take(&mut rest, 2)?;
    let wrapped_len = usize::from(u16::from_be_bytes([wrapped_len[0], wrapped_len[1]]));
    let wrapped = take(&mut rest, wrapped_len)?;
    let header = &bytes[1..bytes.len() - rest.len()];
    let nonce = take(&mut rest, NONCE_LEN)?;
    if rest.len() < TAG_LEN {
        return Err("truncated envelope");
    }
    Ok(Envelope {
        format,
        key_id,
        header,
        wrapped,
        nonce,
        ciphertext: rest,
    })
}

/// The header of an envelope under `key_id` with this wrapped key; `None` if the wrapped key
/// is longer than 65535 bytes.
pub(super) fn header(key_id: &KeyId, wrapped: &[u8]) -> Option<Box<[u8]>> {
    let wrapped_len = u16::try_from(wrapped.len()).ok()?;
    let id = key_id.as_str().as_bytes();
    let mut out = Vec::with_capacity(3 + id.len() + wrapped.len());
    // KeyId guarantees 1..=64 bytes.
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    out.extend_from_slice(&wrapped_len.to_be_bytes());
    out.extend_from_slice(wrapped);
    Some(out.into_boxed_slice())
}

/// The record's key, each part length-prefixed so that no two keys encode alike (`a/bc` vs
/// `ab/c`), after a prefix naming the format.
fn record_aad(format: u8, key: &TokenKey, extra: usize) -> Vec<u8> {
    let parts = [
        key.realm.as_str(),
        key.subject.as_str(),
        key.provider.as_str(),
    ];
    let mut aad =
        Vec::with_capacity(20 + 8 * 4 + extra + parts.iter().map(|p| p.len()).sum::<usize>());
    aad.extend_from_slice(b"tokenbroker/record/");
    aad.push(format);
    for part in parts {
        put_len_prefixed(&mut aad, part.as_bytes());
    }
    aad
}

/// What a format-1 envelope authenticates, in the data key's wrapping and in the payload.
pub(super) fn record_aad_v1(key: &TokenKey) -> Vec<u8> {
    record_aad(FORMAT_V1, key, 0)
}

/// What a format-2 payload authenticates: the record's key and the KEK id, so that a
/// ciphertext copied to another row (or given another KEK id) does not decrypt.
pub(super) fn record_aad_v2(key: &TokenKey, key_id: &KeyId) -> Vec<u8> {
    let id = key_id.as_str().as_bytes();
    let mut aad = record_aad(FORMAT_V2, key, id.len());
    put_len_prefixed(&mut aad, id);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_never_starts_with_a_reserved_byte() {
        // The first byte of any JSON text: whitespace or the start of a value.
        for b in b" \t\n\r{[\"-0123456789tfn" {
            assert!(!RESERVED.contains(b));
        }
        assert!(RESERVED.contains(&FORMAT_V1) && RESERVED.contains(&FORMAT_V2));
    }

    #[test]
    fn plain_records_are_json_objects() {
        assert!(matches!(parse(br#"{"v":1}"#), Ok(Parsed::Plain)));
        assert!(matches!(parse(b" \n{\"v\":2}"), Ok(Parsed::Plain)));
        assert!(is_json_object(b" {\"v\":2,\"set\":{}} \n"));
        assert!(!is_json_object(b"{\"v\":2"));
        assert!(!is_json_object(b"{} trailing"));
        for not_plain in [&b""[..], b"[1]", b"\"s\"", b"garbage", b"\xE3abc", b"\xEF"] {
            assert!(parse(not_plain).is_err(), "{not_plain:?}");
        }
        // An envelope whose format byte is known but whose body does not parse stays corrupt.
        assert_eq!(
            parse(b"\xE2\x02k1").err(),
            Some("truncated envelope"),
            "a broken envelope is not plain"
        );
    }

    #[test]
    fn header_round_trips_through_parse() {
        let id = KeyId::new("k1").unwrap();
        let wrapped = [7u8; 72];
        let header = header(&id, &wrapped).unwrap();
        let mut bytes = vec![FORMAT_V2];
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&[0u8; NONCE_LEN + TAG_LEN + 3]);
        let Ok(Parsed::Envelope(env)) = parse(&bytes) else {
            panic!("did not parse");
        };
        assert_eq!(env.header, &header[..]);
        assert_eq!(env.wrapped, &wrapped[..]);
        assert_eq!(env.key_id, id);
        assert_eq!(env.ciphertext.len(), TAG_LEN + 3);
        assert!(super::header(&id, &vec![0u8; 65536]).is_none());
    }

    #[test]
    fn record_aads_bind_every_part_and_the_format() {
        let k = |r: &str, s: &str| TokenKey::parse(r, s, "google").unwrap();
        let id = KeyId::new("k1").unwrap();
        assert_ne!(
            record_aad_v2(&k("ab", "c"), &id),
            record_aad_v2(&k("a", "bc"), &id)
        );
        assert_ne!(
            record_aad_v2(&k("a", "b"), &id),
            record_aad_v2(&k("a", "b"), &KeyId::new("k2").unwrap())
        );
        assert!(!record_aad_v2(&k("a", "b"), &id).starts_with(&record_aad_v1(&k("a", "b"))));
        assert!(!INTERMEDIATE_KEY_AAD.starts_with(b"tokenbroker/record/"));
    }
}
